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
import re
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from bioray.errors import ConfigError

if TYPE_CHECKING:
    from bioray.config.schema import (Config, CorpusSection, DataSection, EvalSection, LoraSection, MixtureSection,
                                      ModelSection, RunSection, SourceConfig, TrackSection, TrainSection,
                                      TuneSection)

FORMATS = ("iob", "re_masked", "nli", "multilabel", "instructions", "messages")
TASKS = ("ner", "re", "nli", "cls", "qa")
SPLITS = ("train", "validation", "test")
# The fields a record of each format is read from, in rows (JSON lines, Parquet, datasets): what
# `columns` may map (bioray.corpus.sources reads them).
FORMAT_FIELDS = {"iob": ("tokens", "tags"), "re_masked": ("sentence", "label"),
                 "nli": ("sentence1", "sentence2", "gold_label"), "multilabel": ("text", "labels"),
                 "instructions": ("instruction", "input", "output"), "messages": ("messages",)}
# Which task each structured format produces; `instructions` and `messages` carry their own.
FORMAT_TASK = {"iob": "ner", "re_masked": "re", "nli": "nli", "multilabel": "cls"}
# bioray's own schedule, then the transformers schedulers that need no argument beyond the steps
# (tests/test_config.py checks every name is transformers' own).
LR_SCHEDULERS = ("cosine_floor", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRETRAIN_TEXTS = ("inputs", "twice", "prompts", "records")
PRETRAIN_PACKINGS = ("isolated", "concatenated")
PRE_TOKENIZERS = ("bytelevel", "words", "trailing_space")
TUNE_SPACE_KINDS = ("choice", "uniform", "loguniform")
# What eval.json reports per task (bioray.evaluate.metrics.score_source; a test keeps them equal):
# eval.score may name any of them as SOURCE/METRIC.
TASK_METRICS = {"ner": ("f1", "precision", "recall", "parse_rate", "n"), "re": ("f1", "accuracy", "parse_rate", "n"),
                "cls": ("f1", "accuracy", "parse_rate", "n"), "nli": ("accuracy", "parse_rate", "n"),
                "qa": ("accuracy", "parse_rate", "n")}
TEMPLATE_FIELDS = ("instruction", "input")
CHAT_TEMPLATE = "chat"  # corpus.template: the tokenizer's own chat template (bioray.corpus.templates.CHAT)
_TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Query parameters of a pyarrow S3 URI that carry credentials (s3://bucket/path?access_key=...).
_URI_SECRETS = ("access_key", "secret_key", "session_token")
# A search builds these once, from the base config, before any trial starts (bioray.tune.search);
# a trial's own value for them would be silently ignored, so tune.space refuses them.
SEARCHABLE = "train.*, lora.*, mixture.* and data.packing"
BUILT_ONCE = {
    "run": "run.* belongs to the whole search (its folder, seed and storage)",
    "corpus": "corpus.* is built once for the whole search (the corpus)",
    "model": "model.* is built once for the whole search (the base model)",
    "data": "{key} is built once for the whole search (the tokenised cache)",
    "eval": "eval.* is built once for the whole search (the scorer pool)",
    "track": "track.* belongs to the whole search (every trial logs to the same trackers)",
}
WANDB_MODES = ("online", "offline")


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
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_train(cfg.train)
    validate_lora(cfg.lora)
    validate_mixture(cfg.mixture)
    validate_eval(cfg.eval)
    validate_tune(cfg.tune)
    validate_track(cfg.track)
    validate_chat_model(cfg)
    validate_mixture_weights(cfg)
    validate_eval_score(cfg)
    validate_tune_space(cfg)


def _at_least(key: str, value: Any, low: int, null_ok: bool = False) -> None:
    if value is None and null_ok:
        return
    if value is None or value < low:
        fail(key, f"an integer >= {low}" + (" or null" if null_ok else ""), value)


def _number(key: str, value: float, low: float, expected: str, strict: bool = False) -> None:
    """A finite number >= ``low`` (> ``low`` with ``strict``); NaN and infinity fail too."""
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        fail(key, expected, value)


def validate_run(r: RunSection) -> None:
    """The seed, credentials kept out of run.storage, and the run's name: a relative path inside run.storage."""
    # numpy's generators (shuffles, packing order) take only non-negative seeds.
    _at_least("run.seed", r.seed, 0)
    if r.storage is not None and _has_credentials(r.storage):
        # Not echoed: the value would reach the terminal, and bioray.yaml would keep it for good.
        raise ConfigError("config key 'run.storage': holds credentials, which bioray.yaml, logs and reports would "
                          "keep; give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead")
    if r.name is not None:
        parts = r.name.split("/")
        if not r.name or r.name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            fail("run.name", "a relative folder name such as my-run or search/trials/t1 (no '..')", r.name)


def _has_credentials(uri: str) -> bool:
    """Whether a storage URI carries a user name, password or secret query parameter."""
    if "://" not in uri:
        return False
    parts = urlsplit(uri)
    return "@" in parts.netloc or any(k in _URI_SECRETS for k in parse_qs(parts.query))


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
        _validate_rows(s, key)
        if s.format == "re_masked" and s.negative_label is not None and s.labels is not None:
            if s.negative_label not in s.labels.values():
                fail(f"{key}.negative_label", "one of the labels map's answer words", s.negative_label)
        if s.instructions is not None and not s.instructions:
            fail(f"{key}.instructions", "a non-empty list or null", s.instructions)
    if not 0 <= c.max_rejected_fraction <= 1:
        fail("corpus.max_rejected_fraction", "a fraction in [0, 1]", c.max_rejected_fraction)
    _validate_template(c)
    _at_least("corpus.shard_mib", c.shard_mib, 1)
    _at_least("corpus.max_line_bytes", c.max_line_bytes, 1024)


def _validate_rows(s: SourceConfig, key: str) -> None:
    """A source's `datasets` keys and its column mapping."""
    if s.dataset is None:
        for name in ("subset", "splits"):
            if getattr(s, name) is not None:
                fail(f"{key}.{name}", f"null unless {key}.dataset is set", getattr(s, name))
        if s.format == "iob" and s.columns is not None:
            fail(f"{key}.columns", "null for iob files (token<TAB>tag lines have no columns)", s.columns)
    else:
        if not s.dataset.strip():
            fail(f"{key}.dataset", "a dataset folder or hub name", s.dataset)
        if s.files:
            fail(f"{key}.files", f"empty when {key}.dataset is set (its splits say what to read)", s.files)
        if not s.splits:
            fail(f"{key}.splits", "a mapping of bioray splits to the dataset's, e.g. {train: train, validation: "
                 "validation}", s.splits)
        for split, name in s.splits.items():
            if split not in SPLITS:
                fail(f"{key}.splits", "bioray split names among " + ", ".join(SPLITS), split)
            if not name.strip():
                fail(f"{key}.splits.{split}", "the dataset's split name", name)
    fields = FORMAT_FIELDS.get(s.format, ())
    for name, column in (s.columns or {}).items():
        if name not in fields:
            fail(f"{key}.columns", f"fields of format {s.format}: {', '.join(fields)}", name)
        if not column.strip():
            fail(f"{key}.columns.{name}", "a column name", column)


def _validate_template(c: CorpusSection) -> None:
    if c.template == CHAT_TEMPLATE:
        if c.system_prompt is not None and not c.system_prompt.strip():
            fail("corpus.system_prompt", "a non-empty system prompt or null", c.system_prompt)
        return
    if c.system_prompt is not None:
        fail("corpus.system_prompt", "null unless corpus.template is chat (a layout has no system turn)",
             c.system_prompt)
    for k in TEMPLATE_FIELDS:
        if "{%s}" % k not in c.template:
            fail("corpus.template", "a layout containing {%s}, or chat" % k, c.template)
    unknown = [f for f in _TEMPLATE_FIELD.findall(c.template) if f not in TEMPLATE_FIELDS]
    if unknown:
        # It would reach every prompt as literal text: the model would learn it, never a value.
        fail("corpus.template", "fields {instruction} and {input} only (unknown: {%s})" % unknown[0], c.template)


def validate_model(m: ModelSection) -> None:
    """The tiny base's shape and pretraining; a revision only where there is a hub to ask."""
    t = m.tiny
    # The byte-level BPE starts from 256 bytes and 3 special tokens.
    _at_least("model.tiny.vocab_size", t.vocab_size, 260)
    for key, value in (("model.tiny.num_layers", t.num_layers), ("model.tiny.num_heads", t.num_heads),
                       ("model.tiny.pretrain_steps", t.pretrain_steps),
                       ("model.tiny.pretrain_batch_size", t.pretrain_batch_size)):
        _at_least(key, value, 1)
    _at_least("model.tiny.hidden_size", t.hidden_size, 8)
    if t.hidden_size % t.num_heads:
        fail("model.tiny.hidden_size", f"a multiple of model.tiny.num_heads ({t.num_heads})", t.hidden_size)
    _number("model.tiny.pretrain_lr", t.pretrain_lr, 0, "a positive learning rate", strict=True)
    if t.pretrain_on not in PRETRAIN_TEXTS:
        fail("model.tiny.pretrain_on", " | ".join(PRETRAIN_TEXTS), t.pretrain_on)
    if t.pretrain_packing not in PRETRAIN_PACKINGS:
        fail("model.tiny.pretrain_packing", " | ".join(PRETRAIN_PACKINGS), t.pretrain_packing)
    if t.pre_tokenizer not in PRE_TOKENIZERS:
        fail("model.tiny.pre_tokenizer", " | ".join(PRE_TOKENIZERS), t.pre_tokenizer)
    if m.revision is not None and (not m.revision.strip() or m.name_or_path == "tiny"):
        fail("model.revision", "null, or a hub branch, tag or commit for a hub model", m.revision)


def validate_data(d: DataSection) -> None:
    """Sequence length, overlong handling and the tokenising tasks."""
    if d.max_seq_len < 16:
        fail("data.max_seq_len", "an integer >= 16", d.max_seq_len)
    if d.overlong not in ("drop", "truncate", "error"):
        fail("data.overlong", "drop | truncate | error", d.overlong)
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
    _number("train.lr", t.lr, 0, "a positive learning rate", strict=True)
    _at_least("train.warmup_steps", t.warmup_steps, 0)
    _number("train.weight_decay", t.weight_decay, 0, "a number >= 0")
    _number("train.grad_clip", t.grad_clip, 0, "a number >= 0 (0 = no clipping)")
    if t.zero_stage not in (0, 1, 2, 3):
        fail("train.zero_stage", "0, 1, 2 or 3", t.zero_stage)
    if t.offload and t.zero_stage == 0:
        fail("train.offload", "false unless train.zero_stage >= 1", t.offload)
    _number("train.cpus_per_worker", t.cpus_per_worker, 0, "a positive number of CPUs", strict=True)
    _at_least("train.checkpoint_every", t.checkpoint_every, 0)
    # Ray Train's CheckpointConfig takes num_to_keep >= 1; below that it fails after training.
    _at_least("train.keep_checkpoints", t.keep_checkpoints, 1)
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
    _at_least("lora.rank", lora.rank, 1)
    _number("lora.alpha", lora.alpha, 0, "a positive number", strict=True)
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
    _at_least("mixture.epoch_size", m.epoch_size, 1, null_ok=True)


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
    _at_least("eval.max_examples", e.max_examples, 1, null_ok=True)
    _at_least("eval.max_new_tokens", e.max_new_tokens, 1, null_ok=True)
    _number("eval.cpus_per_actor", e.cpus_per_actor, 0, "a positive number of CPUs", strict=True)
    _number("eval.gpus_per_actor", e.gpus_per_actor, 0, "a number of GPUs >= 0")
    if e.score != "mean" and e.score.count("/") < 1:
        fail("eval.score", "mean, or SOURCE/METRIC (e.g. ncbi_disease/f1)", e.score)


def validate_tune(tu: TuneSection) -> None:
    """The search's own settings and the form of each ``tune.space`` entry (its key is checked
    against the schema in :func:`validate_tune_space`)."""
    _at_least("tune.num_samples", tu.num_samples, 1)
    # ASHA keeps the top 1/reduction_factor at each rung: 1 would keep every trial (Ray refuses it).
    _at_least("tune.reduction_factor", tu.reduction_factor, 2)
    _at_least("tune.max_concurrent_trials", tu.max_concurrent_trials, 1, null_ok=True)
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
    _at_least("tune.grace_steps", tu.grace_steps, 1, null_ok=True)
    if not (tu.trial_cpus > 0 and math.isfinite(tu.trial_cpus)):
        fail("tune.trial_cpus", "a positive number of CPUs (Tune needs a non-empty bundle)", tu.trial_cpus)
    for key, spec in tu.space.items():
        where = f"tune.space.{key}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in TUNE_SPACE_KINDS):
            fail(where, "one of {choice: [...]}, {uniform: [low, high]}, {loguniform: [low, high]}", spec)
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            fail(where, f"{kind}: a list" + ("" if kind == "choice" else " [low, high]"), args)
        if kind != "choice" and not _is_range(args, positive=kind == "loguniform"):
            fail(where, f"{kind}: [low, high], numbers with " + ("0 < " if kind == "loguniform" else "")
                 + "low <= high", args)


def validate_track(t: TrackSection) -> None:
    """Tracker settings: no credentials in the tracking URI, names that are names, a known W&B mode."""
    m, w = t.mlflow, t.wandb
    if m.tracking_uri is not None and not m.tracking_uri.strip():
        fail("track.mlflow.tracking_uri", "a tracking URI, or null", m.tracking_uri)
    if m.tracking_uri is not None and _has_credentials(m.tracking_uri):
        # Not echoed, as for run.storage: bioray.yaml would keep it for good.
        raise ConfigError("config key 'track.mlflow.tracking_uri': holds credentials, which bioray.yaml, logs and "
                          "reports would keep; give them in the environment (MLFLOW_TRACKING_TOKEN, or "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) instead")
    if not m.experiment.strip():
        fail("track.mlflow.experiment", "a non-empty experiment name", m.experiment)
    if w.mode not in WANDB_MODES:
        fail("track.wandb.mode", " | ".join(WANDB_MODES), w.mode)
    for key, value in (("track.wandb.project", w.project), ("track.wandb.entity", w.entity)):
        if value is not None and (not value.strip() or "/" in value):
            fail(key, "a name without '/', or null", value)


def _is_range(args: list, positive: bool) -> bool:
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args):
        return False
    return args[0] <= args[1] and (args[0] > 0 or not positive)


def validate_chat_model(cfg: Config) -> None:
    """``corpus.template: chat`` needs a tokenizer with a chat template, which the tiny base's has not."""
    if cfg.corpus.template == CHAT_TEMPLATE and cfg.model.name_or_path == "tiny":
        fail("corpus.template", "a layout with {instruction} and {input} for model.name_or_path: tiny (its "
             "tokenizer has no chat template; chat needs a chat/instruct model)", cfg.corpus.template)


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
    keys_used = {s.name if m.by == "source" else s.task for s in sources if "train" in s.split_names()}
    if m.weights and keys_used and all(m.weight(k) == 0 for k in keys_used):
        fail("mixture.weights", "at least one positive weight", m.weights)


def validate_eval_score(cfg: Config) -> None:
    """``eval.score``: mean, or SOURCE/METRIC naming a source and a metric its task reports.

    Checked here, not when the first checkpoint is scored after training.
    """
    score, sources = cfg.eval.score, cfg.corpus.sources
    if score == "mean" or not sources:
        return
    name, _, metric = score.rpartition("/")
    tasks = {s.name: s.task for s in sources}
    if name not in tasks:
        fail("eval.score", f"mean, or SOURCE/METRIC with SOURCE among {sorted(tasks)}", score)
    if metric not in TASK_METRICS[tasks[name]]:
        fail("eval.score", f"a metric of {name} ({tasks[name]}): {', '.join(TASK_METRICS[tasks[name]])}", score)


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
