"""bioray's one config schema: typed dataclasses, YAML files and ``--set`` overrides.

Defaults live here and nowhere else. A config is built as defaults <- YAML <- ``--set``,
checked once (unknown keys, wrong types, bad combinations fail naming the key), and crosses
process boundaries as the plain dict of :func:`to_dict`; the receiver calls :func:`from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from bioray.errors import ConfigError

FORMATS = ("iob", "re_masked", "nli", "multilabel", "instructions")
TASKS = ("ner", "re", "nli", "cls", "qa")
SPLITS = ("train", "validation", "test")
# Which task each structured format produces; `instructions` carries its own.
FORMAT_TASK = {"iob": "ner", "re_masked": "re", "nli": "nli", "multilabel": "cls"}


@dataclass
class RunSection:
    dir: str = "runs/quickstart"
    """Everything a run writes goes under this folder (a local path)."""
    seed: int = 0
    """Seeds instruction draws, mixing, LoRA init and data order."""
    storage: Optional[str] = None
    """Where Ray Train persists checkpoints (local path or s3://...); null = run.dir (checkpoints/ in it)."""
    quiet: bool = False
    """Silence progress lines (the jobs' `--quiet` sets it)."""


@dataclass
class SourceConfig:
    name: str = ""
    """Unique source name; mixture weights, reports and record ids key on it."""
    format: str = "iob"
    """File layout: iob | re_masked | nli | multilabel | instructions."""
    task: str = "ner"
    """ner | re | nli | cls | qa: decides the answer parser and the metric."""
    files: dict[str, str] = field(default_factory=dict)
    """Split name (train/validation/test) -> file path (relative to the working directory)."""
    entity: Optional[str] = None
    """iob only: what the instruction asks the model to tag (e.g. disease)."""
    typed: bool = False
    """iob only: keep entity types in the answer tags (B-protein) instead of plain B/I/O."""
    labels: Optional[dict[Any, str]] = None
    """re_masked/multilabel: raw label -> answer word. Keys match the raw label's text."""
    negative_label: Optional[str] = None
    """re_masked: the answer word that RE f1 leaves out (e.g. false)."""
    none_label: str = "none"
    """multilabel: the answer when a text has no label."""
    instructions: Optional[list[str]] = None
    """Paraphrased instructions to draw from; null = bioray's own set for the task."""
    reference: Optional[dict[str, Any]] = None
    """Published scores to print beside ours, e.g. {metric: f1, paper_13b: 85.69} (percent)."""


@dataclass
class CorpusSection:
    sources: list[SourceConfig] = field(default_factory=list)
    """One entry per source dataset."""
    sample_dir: Optional[str] = None
    """If set, bioray first writes its synthetic sample files (iob/re/nli) into this folder."""
    template: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
    """Prompt layout; the answer follows it directly. Default: the paper's layout."""
    max_rejected_fraction: float = 0.001
    """Fail the build when more than this share of lines is rejected (0 = any rejection)."""
    shard_mib: int = 64
    """In-memory MiB of records gathered into one Parquet shard of run.dir/corpus/ (smaller on disk)."""


@dataclass
class TinyModelSection:
    vocab_size: int = 2048
    """BPE vocabulary trained on the corpus."""
    hidden_size: int = 256
    """Model width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    pretrain_steps: int = 500
    """Full-parameter causal-LM steps on the corpus text before LoRA (random bases learn nothing)."""
    pretrain_batch_size: int = 8
    """Sequences (of 256 tokens) per pretraining step."""
    pretrain_lr: float = 2.0e-3
    """Peak learning rate of pretraining."""


@dataclass
class ModelSection:
    name_or_path: str = "tiny"
    """`tiny` (built and cached locally), a hub id, or a local Hugging Face folder."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; off unless you trust the model's code."""
    tiny: TinyModelSection = field(default_factory=TinyModelSection)
    """Shape and pretraining of the `tiny` base."""


@dataclass
class DataSection:
    max_seq_len: int = 512
    """Longest tokenised example (prompt + answer + EOS) and packed sequence length."""
    packing: bool = True
    """Pack several examples per sequence; each attends only within itself."""
    overlong: str = "drop"
    """Examples longer than max_seq_len: drop | truncate (truncate cuts the prompt, never the answer)."""
    cache_dir: Optional[str] = None
    """Tokenised cache and built tiny models; null = ~/.cache/bioray (or $BIORAY_CACHE)."""
    tokenise_batch_size: int = 2048
    """Records per tokenising task (corpus row groups are grouped up to about this many)."""
    tokenise_tasks: Optional[int] = None
    """Most tokenising tasks at once; null = as many as the cluster's CPUs allow."""
    tokenise_cpus: float = 1.0
    """Logical CPUs per tokenising task (each task reads, tokenises and writes one block)."""


@dataclass
class TrainSection:
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL, bf16); false = CPU (gloo, fp32)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs reserved per worker; fractions leave room for Ray Data and scorers."""
    max_steps: int = 200
    """Optimizer steps per worker."""
    lr: float = 2.0e-4
    """Peak learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 = off)."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload: bool = False
    """ZeRO optimizer (and, at stage 3, parameter) offload to CPU memory."""
    full_finetune: bool = False
    """Train every weight instead of a LoRA adapter (the paper's setting)."""
    report_every: int = 20
    """Steps between metric reports (a report costs about a second)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Best checkpoints kept by eval score."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from, resuming at the latest checkpoint."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class LoraSection:
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (scale = alpha / rank)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters."""


@dataclass
class MixtureSection:
    weights: dict[str, float] = field(default_factory=dict)
    """Per source (or task, with by: task) weight; missing ones weigh 1.0; 0 drops it."""
    by: str = "source"
    """source | task: what the weights key on."""
    replacement: bool = False
    """Draw with replacement (small sources repeat) or without (an epoch ends when one runs out)."""
    epoch_size: Optional[int] = None
    """Records one mixed epoch draws; null = as many as the weights allow without replacement."""


@dataclass
class EvalSection:
    split: str = "validation"
    """Split of each source that is scored."""
    max_examples: Optional[int] = 64
    """Examples per source; null = all."""
    decoding: str = "free"
    """free (greedy/beam text, parsed afterwards: the paper) | constrained (answers always parse)."""
    batch_size: int = 32
    """Examples per generation batch."""
    num_beams: int = 1
    """Beam width for free decoding (the paper: 4)."""
    max_new_tokens: Optional[int] = None
    """Answer length cap; null = from the longest reference answer."""
    num_actors: int = 1
    """Scorer actors in the evaluation pool."""
    cpus_per_actor: float = 1.0
    """Logical CPUs per scorer actor."""
    gpus_per_actor: float = 0.0
    """GPUs per scorer actor (fractions share a GPU)."""
    score: str = "mean"
    """Checkpoint score: mean (of each source's primary metric) or SOURCE/METRIC."""


@dataclass
class TuneSection:
    num_samples: int = 4
    """Trials in the search."""
    max_concurrent_trials: Optional[int] = None
    """Trials at once; null = as many as the cluster's CPUs (GPUs) fit beside the scorer pool."""
    scheduler: str = "asha"
    """asha (stops trials that score low at a checkpoint, on the task score) | fifo (every trial runs to the end)."""
    search: str = "random"
    """random | optuna (model-based; needs the optuna package)."""
    lr: Optional[list[float]] = field(default_factory=lambda: [1.0e-4, 1.0e-2])
    """[low, high] of train.lr, sampled log-uniformly; null = not searched."""
    rank: Optional[list[int]] = field(default_factory=lambda: [4, 8, 16])
    """lora.rank choices; null = not searched."""
    mixture: bool = True
    """Search mixture.weights: one point on the simplex per trial (per-source factors, normalised)."""
    mixture_low: float = 0.2
    """Lowest factor a source can draw before normalising (0 lets a trial all but drop a source)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Any other key by dotted name: {choice: [...]} | {uniform: [low, high]} | {loguniform: [low, high]}."""
    grace_steps: Optional[int] = None
    """ASHA: steps before a trial can be stopped; null = two checkpoints (2 x train.checkpoint_every)."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    trial_cpus: float = 0.1
    """Logical CPUs of each trial's own process (its training workers are scheduled beside it)."""


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    mixture: MixtureSection = field(default_factory=MixtureSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tune: TuneSection = field(default_factory=TuneSection)
    """Ray Tune search (jobs/tune.py); unused by finetune."""

    def __post_init__(self) -> None:
        _validate(self)


def _fail(key: str, expected: str, got: Any) -> None:
    raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


def _validate(cfg: Config) -> None:
    names = [s.name for s in cfg.corpus.sources]
    for i, s in enumerate(cfg.corpus.sources):
        key = f"corpus.sources[{i}]"
        if not s.name:
            _fail(f"{key}.name", "a non-empty source name", s.name)
        if s.name in names[:i]:
            _fail(f"{key}.name", "a unique source name", s.name)
        if s.format not in FORMATS:
            _fail(f"{key}.format", " | ".join(FORMATS), s.format)
        if s.task not in TASKS:
            _fail(f"{key}.task", " | ".join(TASKS), s.task)
        if s.format in FORMAT_TASK and s.task != FORMAT_TASK[s.format]:
            _fail(f"{key}.task", f"{FORMAT_TASK[s.format]} for format {s.format}", s.task)
        for split in s.files:
            if split not in SPLITS:
                _fail(f"{key}.files", "split names among " + ", ".join(SPLITS), split)
        if s.format == "re_masked" and s.negative_label is not None and s.labels is not None:
            if s.negative_label not in s.labels.values():
                _fail(f"{key}.negative_label", "one of the labels map's answer words", s.negative_label)
        if s.instructions is not None and not s.instructions:
            _fail(f"{key}.instructions", "a non-empty list or null", s.instructions)
    if not 0 <= cfg.corpus.max_rejected_fraction <= 1:
        _fail("corpus.max_rejected_fraction", "a fraction in [0, 1]", cfg.corpus.max_rejected_fraction)
    for k in ("{instruction}", "{input}"):
        if k not in cfg.corpus.template:
            _fail("corpus.template", f"a layout containing {k}", cfg.corpus.template)
    if cfg.data.max_seq_len < 16:
        _fail("data.max_seq_len", "an integer >= 16", cfg.data.max_seq_len)
    if cfg.data.overlong not in ("drop", "truncate"):
        _fail("data.overlong", "drop | truncate", cfg.data.overlong)
    if cfg.corpus.shard_mib < 1:
        _fail("corpus.shard_mib", "an integer >= 1", cfg.corpus.shard_mib)
    if cfg.data.tokenise_batch_size < 1:
        _fail("data.tokenise_batch_size", "an integer >= 1", cfg.data.tokenise_batch_size)
    if cfg.data.tokenise_tasks is not None and cfg.data.tokenise_tasks < 1:
        _fail("data.tokenise_tasks", "an integer >= 1 or null", cfg.data.tokenise_tasks)
    if not (cfg.data.tokenise_cpus > 0 and math.isfinite(cfg.data.tokenise_cpus)):
        _fail("data.tokenise_cpus", "a positive number of CPUs", cfg.data.tokenise_cpus)
    _validate_tune(cfg)
    t = cfg.train
    for key, value in (("train.num_workers", t.num_workers), ("train.max_steps", t.max_steps),
                       ("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.report_every", t.report_every), ("lora.rank", cfg.lora.rank),
                       ("eval.batch_size", cfg.eval.batch_size), ("eval.num_beams", cfg.eval.num_beams),
                       ("eval.num_actors", cfg.eval.num_actors)):
        if value < 1:
            _fail(key, "an integer >= 1", value)
    if not (t.lr > 0 and math.isfinite(t.lr)):
        _fail("train.lr", "a positive learning rate", t.lr)
    if t.zero_stage not in (0, 1, 2, 3):
        _fail("train.zero_stage", "0, 1, 2 or 3", t.zero_stage)
    if t.offload and t.zero_stage == 0:
        _fail("train.offload", "false unless train.zero_stage >= 1", t.offload)
    if t.cpus_per_worker <= 0:
        _fail("train.cpus_per_worker", "a positive number of CPUs", t.cpus_per_worker)
    if t.checkpoint_every < 0:
        _fail("train.checkpoint_every", "an integer >= 0", t.checkpoint_every)
    if not 0 <= cfg.lora.dropout < 1:
        _fail("lora.dropout", "a fraction in [0, 1)", cfg.lora.dropout)
    if not cfg.lora.target_modules:
        _fail("lora.target_modules", "a non-empty list of module names", cfg.lora.target_modules)
    if cfg.mixture.by not in ("source", "task"):
        _fail("mixture.by", "source | task", cfg.mixture.by)
    keys = set(names) if cfg.mixture.by == "source" else {s.task for s in cfg.corpus.sources}
    for name, w in cfg.mixture.weights.items():
        if cfg.corpus.sources and name not in keys:
            _fail(f"mixture.weights.{name}", f"a {cfg.mixture.by} name among {sorted(keys)}", name)
        if not (math.isfinite(w) and w >= 0):
            _fail(f"mixture.weights.{name}", "a finite weight >= 0", w)
    if cfg.corpus.sources and cfg.mixture.weights:
        keys_used = {s.name if cfg.mixture.by == "source" else s.task for s in cfg.corpus.sources
                     if "train" in s.files}
        if keys_used and all(cfg.mixture.weights.get(k, 1.0) == 0 for k in keys_used):
            _fail("mixture.weights", "at least one positive weight", cfg.mixture.weights)
    if cfg.eval.decoding not in ("free", "constrained"):
        _fail("eval.decoding", "free | constrained", cfg.eval.decoding)
    if cfg.eval.split not in SPLITS:
        _fail("eval.split", " | ".join(SPLITS), cfg.eval.split)
    if cfg.eval.max_examples is not None and cfg.eval.max_examples < 1:
        _fail("eval.max_examples", "an integer >= 1 or null", cfg.eval.max_examples)


# ---------------------------------------------------------------- dict <-> dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            type(None): "null", Any: "any value"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        _fail(key, _type_name(tp), value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            _fail(key, _type_name(tp), value)
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, _type_name(tp), value)
        ktp, vtp = typing.get_args(tp)
        return {_convert(k, ktp, key): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, "true/false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `2e-4` (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                _fail(key, "a number", value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix or "<top level>", "a mapping", data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    data = _renamed(data, prefix)
    for k in data:
        if k not in known:
            full = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"config key '{full}': unknown key (expected one of: {', '.join(sorted(known))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


TUNE_SPACE_KINDS = ("choice", "uniform", "loguniform")


def _validate_tune(cfg: Config) -> None:
    tu = cfg.tune
    for key, value in (("tune.num_samples", tu.num_samples), ("tune.reduction_factor", tu.reduction_factor)):
        if value < 1:
            _fail(key, "an integer >= 1", value)
    if tu.max_concurrent_trials is not None and tu.max_concurrent_trials < 1:
        _fail("tune.max_concurrent_trials", "an integer >= 1 or null", tu.max_concurrent_trials)
    if tu.scheduler not in ("asha", "fifo"):
        _fail("tune.scheduler", "asha | fifo", tu.scheduler)
    if tu.search not in ("random", "optuna"):
        _fail("tune.search", "random | optuna", tu.search)
    if tu.lr is not None and not (len(tu.lr) == 2 and 0 < tu.lr[0] <= tu.lr[1] and math.isfinite(tu.lr[1])):
        _fail("tune.lr", "[low, high] with 0 < low <= high, or null", tu.lr)
    if tu.rank is not None and (not tu.rank or any(r < 1 for r in tu.rank)):
        _fail("tune.rank", "a non-empty list of ranks >= 1, or null", tu.rank)
    if not (0 <= tu.mixture_low <= 1):
        _fail("tune.mixture_low", "a factor in [0, 1]", tu.mixture_low)
    if tu.grace_steps is not None and tu.grace_steps < 1:
        _fail("tune.grace_steps", "an integer >= 1 or null", tu.grace_steps)
    if not (tu.trial_cpus > 0 and math.isfinite(tu.trial_cpus)):
        _fail("tune.trial_cpus", "a positive number of CPUs (Tune needs a non-empty bundle)", tu.trial_cpus)
    for key, spec in tu.space.items():
        where = f"tune.space.{key}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in TUNE_SPACE_KINDS):
            _fail(where, "one of {choice: [...]}, {uniform: [low, high]}, {loguniform: [low, high]}", spec)
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            _fail(where, f"{kind}: a list" + ("" if kind == "choice" else " [low, high]"), args)
        section, _, name = str(key).partition(".")
        sub = getattr(cfg, section, None)
        if not name or section == "tune" or sub is None or not hasattr(sub, name.split(".")[0]):
            _fail(where, "a config key by dotted name (e.g. train.warmup_steps)", key)


# Keys that were renamed (or dropped: None): old configs and checkpoints' bioray.yaml still
# load, with a warning.
RENAMED = {"data.tokenise_actors": "data.tokenise_tasks", "corpus.records_per_shard": None}


def _renamed(data: dict, prefix: str) -> dict:
    out = dict(data)
    for old, new in RENAMED.items():
        section, _, key = old.rpartition(".")
        if section != prefix or key not in out:
            continue
        value = out.pop(key)
        if new is None:
            logging.getLogger("bioray").warning("config key '%s' is no longer used; ignoring it", old)
            continue
        out.setdefault(new.rpartition(".")[2], value)
        logging.getLogger("bioray").warning("config key '%s' is now '%s'; please rename it", old, new)
    return out


def from_dict(data: dict) -> Config:
    """Builds and validates a Config from a plain (possibly partial) dict.

    Raises:
        ConfigError: naming the first unknown key, wrong type or bad value.
    """
    return _build(Config, data, "")


def to_dict(cfg: Config) -> dict:
    """The plain-dict form that crosses process boundaries and is written as bioray.yaml."""
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Applies one ``a.b.c=VALUE`` override (VALUE parsed as YAML) to a raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: VALUE is not valid YAML ({e.__class__.__name__})") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(node, last, key)
        node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"config key '{key}': cannot set inside a {type(node).__name__}")


def _index(node: list, part: str, key: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"config key '{key}': expected a list index below {len(node)}, got {part!r}")
    return int(part)


def _list_item(node: list, part: str, key: str) -> Any:
    return node[_index(node, part, key)]


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML config file into a raw dict, with file:line on syntax errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return data


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds the config from defaults, a YAML file and ``--set`` overrides.

    Args:
        path: YAML file; None = no file (defaults only).
        overrides: ``KEY=VALUE`` strings, applied in order.

    Raises:
        ConfigError: on any unknown key, wrong type or invalid value.
    """
    data = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def dump(cfg: Config) -> str:
    """The resolved config as YAML text (what bioray.yaml holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """docs/config.md: every key with its type, default and docstring, generated from this schema."""
    lines = ["# Config reference", "",
             "Generated from `bioray/config.py` (`python -m bioray.config > docs/config.md`); a test keeps",
             "it in sync. Every key can be set in a YAML file or with `--set KEY=VALUE` (VALUE is YAML).", ""]

    def section(cls: type, prefix: str) -> None:
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        defaults = cls() if cls is not SourceConfig else None
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{prefix}{f.name}."))
                continue
            default = getattr(defaults, f.name) if defaults is not None else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            shown = json.dumps(default)
            doc = docs.get(f.name, "").replace("|", "\\|")  # a pipe would end the table cell
            rows.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{shown}` | {doc} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", "| key | type | default | meaning |",
                          "|---|---|---|---|", *rows, ""])
        for tp, p in nested:
            section(tp, p)

    for f in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[f.name]
        if dataclasses.is_dataclass(tp):
            section(tp, f"{f.name}.")
    lines += ["## `corpus.sources[]` (one entry per source)", "", "| key | type | default | meaning |",
              "|---|---|---|---|"]
    docs = _field_docs(SourceConfig)
    hints = typing.get_type_hints(SourceConfig)
    for f in dataclasses.fields(SourceConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = json.dumps(default)
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{shown}` | {docs.get(f.name, '')} |")
    lines += ["", "## `tune`", "", _field_docs(Config).get("tune", ""), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
