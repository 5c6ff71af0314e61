"""Checks on a built config: one function per section, then the checks across sections.

:func:`validate` runs them all from ``Config.__post_init__``; the first bad value raises a
one-line :class:`~bioray.errors.ConfigError` naming the key (``config key 'X': expected ...,
got ...``). Types were already checked while the dataclasses were built (``load.from_dict``);
these are the value ranges and the combinations. This module imports nothing from the schema
at run time (the schema imports it), only the annotations name its classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, NoReturn

from bioray.errors import ConfigError

if TYPE_CHECKING:
    from bioray.config.schema import (Config, CorpusSection, RunSection, DataSection, EvalSection, LoraSection,
                                      MixtureSection, TrainSection, TuneSection)

FORMATS = ("iob", "re_masked", "nli", "multilabel", "instructions")
TASKS = ("ner", "re", "nli", "cls", "qa")
SPLITS = ("train", "validation", "test")
# Which task each structured format produces; `instructions` carries its own.
FORMAT_TASK = {"iob": "ner", "re_masked": "re", "nli": "nli", "multilabel": "cls"}
# bioray's own schedule, then the transformers schedulers that need no argument beyond the steps
# (tests/test_config.py checks every name is transformers' own).
LR_SCHEDULERS = ("cosine_floor", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TUNE_SPACE_KINDS = ("choice", "uniform", "loguniform")
# A search builds these once, from the base config, before any trial starts (bioray.tune.search);
# a trial's own value for them would be silently ignored, so tune.space refuses them.
SEARCHABLE = "train.*, lora.*, mixture.* and data.packing"
BUILT_ONCE = {
    "run": "run.* belongs to the whole search (its folder, seed and storage)",
    "corpus": "corpus.* is built once for the whole search (the corpus)",
    "model": "model.* is built once for the whole search (the base model)",
    "data": "{key} is built once for the whole search (the tokenised cache)",
    "eval": "eval.* is built once for the whole search (the scorer pool)",
}


def fail(key: str, expected: str, got: Any) -> NoReturn:
    """Raises the one-line error for a bad value.

    Raises:
        ConfigError: ``config key 'KEY': expected EXPECTED, got GOT``.
    """
    raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


def validate(cfg: Config) -> None:
    """Checks every section, then the combinations across sections.

    Raises:
        ConfigError: naming the first bad key.
    """
    validate_run(cfg.run)
    validate_corpus(cfg.corpus)
    validate_data(cfg.data)
    validate_train(cfg.train)
    validate_lora(cfg.lora)
    validate_mixture(cfg.mixture)
    validate_eval(cfg.eval)
    validate_tune(cfg.tune)
    validate_mixture_weights(cfg)
    validate_tune_space(cfg)


def validate_run(r: RunSection) -> None:
    """The run's name under run.storage: a relative path that stays inside it."""
    if r.name is not None:
        parts = r.name.split("/")
        if not r.name or r.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            fail("run.name", "a relative folder name such as my-run or search/trials/t1 (no '..')", r.name)


def validate_corpus(c: CorpusSection) -> None:
    """The sources (unique names, known formats, tasks and splits) and the corpus settings."""
    names = [s.name for s in c.sources]
    for i, s in enumerate(c.sources):
        key = f"corpus.sources[{i}]"
        if not s.name:
            fail(f"{key}.name", "a non-empty source name", s.name)
        if s.name in names[:i]:
            fail(f"{key}.name", "a unique source name", s.name)
        if s.format not in FORMATS:
            fail(f"{key}.format", " | ".join(FORMATS), s.format)
        if s.task not in TASKS:
            fail(f"{key}.task", " | ".join(TASKS), s.task)
        if s.format in FORMAT_TASK and s.task != FORMAT_TASK[s.format]:
            fail(f"{key}.task", f"{FORMAT_TASK[s.format]} for format {s.format}", s.task)
        for split in s.files:
            if split not in SPLITS:
                fail(f"{key}.files", "split names among " + ", ".join(SPLITS), split)
        if s.format == "re_masked" and s.negative_label is not None and s.labels is not None:
            if s.negative_label not in s.labels.values():
                fail(f"{key}.negative_label", "one of the labels map's answer words", s.negative_label)
        if s.instructions is not None and not s.instructions:
            fail(f"{key}.instructions", "a non-empty list or null", s.instructions)
    if not 0 <= c.max_rejected_fraction <= 1:
        fail("corpus.max_rejected_fraction", "a fraction in [0, 1]", c.max_rejected_fraction)
    for k in ("{instruction}", "{input}"):
        if k not in c.template:
            fail("corpus.template", f"a layout containing {k}", c.template)
    if c.shard_mib < 1:
        fail("corpus.shard_mib", "an integer >= 1", c.shard_mib)


def validate_data(d: DataSection) -> None:
    """Sequence length, overlong handling and the tokenising tasks."""
    if d.max_seq_len < 16:
        fail("data.max_seq_len", "an integer >= 16", d.max_seq_len)
    if d.overlong not in ("drop", "truncate"):
        fail("data.overlong", "drop | truncate", d.overlong)
    if d.tokenise_batch_size < 1:
        fail("data.tokenise_batch_size", "an integer >= 1", d.tokenise_batch_size)
    if d.tokenise_tasks is not None and d.tokenise_tasks < 1:
        fail("data.tokenise_tasks", "an integer >= 1 or null", d.tokenise_tasks)
    if not (d.tokenise_cpus > 0 and math.isfinite(d.tokenise_cpus)):
        fail("data.tokenise_cpus", "a positive number of CPUs", d.tokenise_cpus)


def validate_train(t: TrainSection) -> None:
    """Counts, learning rate, ZeRO stage and offload, CPUs per worker."""
    for key, value in (("train.num_workers", t.num_workers), ("train.max_steps", t.max_steps),
                       ("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.report_every", t.report_every)):
        if value < 1:
            fail(key, "an integer >= 1", value)
    if not (t.lr > 0 and math.isfinite(t.lr)):
        fail("train.lr", "a positive learning rate", t.lr)
    if t.zero_stage not in (0, 1, 2, 3):
        fail("train.zero_stage", "0, 1, 2 or 3", t.zero_stage)
    if t.offload and t.zero_stage == 0:
        fail("train.offload", "false unless train.zero_stage >= 1", t.offload)
    if t.cpus_per_worker <= 0:
        fail("train.cpus_per_worker", "a positive number of CPUs", t.cpus_per_worker)
    if t.checkpoint_every < 0:
        fail("train.checkpoint_every", "an integer >= 0", t.checkpoint_every)
    if t.max_failures < -1:
        fail("train.max_failures", "an integer >= 0, or -1 for no limit", t.max_failures)
    if t.epochs is not None and not (t.epochs > 0 and math.isfinite(t.epochs)):
        fail("train.epochs", "a positive number of epochs, or null", t.epochs)
    if t.lr_scheduler not in LR_SCHEDULERS:
        fail("train.lr_scheduler", " | ".join(LR_SCHEDULERS), t.lr_scheduler)
    if not t.optimizer.isidentifier():
        fail("train.optimizer", "a torch.optim class name such as AdamW", t.optimizer)
    if t.precision not in PRECISIONS:
        fail("train.precision", " | ".join(PRECISIONS), t.precision)
    if t.precision == "fp16" and not t.use_gpu:
        fail("train.precision", "bf16, fp32 or auto on CPU (fp16 needs train.use_gpu: true)", t.precision)


def validate_lora(lora: LoraSection) -> None:
    """Rank, dropout and target modules."""
    if lora.rank < 1:
        fail("lora.rank", "an integer >= 1", lora.rank)
    if not 0 <= lora.dropout < 1:
        fail("lora.dropout", "a fraction in [0, 1)", lora.dropout)
    if not lora.target_modules:
        fail("lora.target_modules", "a non-empty list of module names", lora.target_modules)


def validate_mixture(m: MixtureSection) -> None:
    """What the weights key on, and each weight's value (its name is checked against the sources
    in :func:`validate_mixture_weights`)."""
    if m.by not in ("source", "task"):
        fail("mixture.by", "source | task", m.by)
    for name, w in m.weights.items():
        if not (math.isfinite(w) and w >= 0):
            fail(f"mixture.weights.{name}", "a finite weight >= 0", w)


def validate_eval(e: EvalSection) -> None:
    """Decoding, split, batch and pool sizes."""
    for key, value in (("eval.batch_size", e.batch_size), ("eval.num_beams", e.num_beams),
                       ("eval.num_actors", e.num_actors)):
        if value < 1:
            fail(key, "an integer >= 1", value)
    if e.decoding not in ("free", "constrained"):
        fail("eval.decoding", "free | constrained", e.decoding)
    if e.split not in SPLITS:
        fail("eval.split", " | ".join(SPLITS), e.split)
    if e.max_examples is not None and e.max_examples < 1:
        fail("eval.max_examples", "an integer >= 1 or null", e.max_examples)


def validate_tune(tu: TuneSection) -> None:
    """The search's own settings and the form of each ``tune.space`` entry (its key is checked
    against the schema in :func:`validate_tune_space`)."""
    for key, value in (("tune.num_samples", tu.num_samples), ("tune.reduction_factor", tu.reduction_factor)):
        if value < 1:
            fail(key, "an integer >= 1", value)
    if tu.max_concurrent_trials is not None and tu.max_concurrent_trials < 1:
        fail("tune.max_concurrent_trials", "an integer >= 1 or null", tu.max_concurrent_trials)
    if tu.scheduler not in ("asha", "fifo"):
        fail("tune.scheduler", "asha | fifo", tu.scheduler)
    if tu.search not in ("random", "optuna"):
        fail("tune.search", "random | optuna", tu.search)
    if tu.lr is not None and not (len(tu.lr) == 2 and 0 < tu.lr[0] <= tu.lr[1] and math.isfinite(tu.lr[1])):
        fail("tune.lr", "[low, high] with 0 < low <= high, or null", tu.lr)
    if tu.rank is not None and (not tu.rank or any(r < 1 for r in tu.rank)):
        fail("tune.rank", "a non-empty list of ranks >= 1, or null", tu.rank)
    if not (0 <= tu.mixture_low <= 1):
        fail("tune.mixture_low", "a factor in [0, 1]", tu.mixture_low)
    if tu.grace_steps is not None and tu.grace_steps < 1:
        fail("tune.grace_steps", "an integer >= 1 or null", tu.grace_steps)
    if not (tu.trial_cpus > 0 and math.isfinite(tu.trial_cpus)):
        fail("tune.trial_cpus", "a positive number of CPUs (Tune needs a non-empty bundle)", tu.trial_cpus)
    for key, spec in tu.space.items():
        where = f"tune.space.{key}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in TUNE_SPACE_KINDS):
            fail(where, "one of {choice: [...]}, {uniform: [low, high]}, {loguniform: [low, high]}", spec)
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            fail(where, f"{kind}: a list" + ("" if kind == "choice" else " [low, high]"), args)


def validate_mixture_weights(cfg: Config) -> None:
    """Each weight names a source (or a task, with ``by: task``), and at least one source with
    training records keeps a positive weight."""
    m, sources = cfg.mixture, cfg.corpus.sources
    if not sources:
        return
    keys = {s.name if m.by == "source" else s.task for s in sources}
    for name in m.weights:
        if name not in keys:
            fail(f"mixture.weights.{name}", f"a {m.by} name among {sorted(keys)}", name)
    keys_used = {s.name if m.by == "source" else s.task for s in sources if "train" in s.files}
    if m.weights and keys_used and all(m.weight(k) == 0 for k in keys_used):
        fail("mixture.weights", "at least one positive weight", m.weights)


def validate_tune_space(cfg: Config) -> None:
    """Each ``tune.space`` key is a config key by dotted name that a trial can change."""
    for key in cfg.tune.space:
        where = f"tune.space.{key}"
        section, _, name = str(key).partition(".")
        # Fields only: a method of the section (MixtureSection.weight) is no key a trial can set.
        sub = getattr(cfg, section) if section in _field_names(cfg) else None
        if not name or section == "tune" or sub is None or name.split(".")[0] not in _field_names(sub):
            fail(where, "a config key by dotted name (e.g. train.warmup_steps)", key)
        if section in BUILT_ONCE and key != "data.packing":
            why = BUILT_ONCE[section].format(key=key)
            raise ConfigError(f"config key '{where}': not searchable: {why}; searchable keys are {SEARCHABLE}")


def _field_names(obj: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
