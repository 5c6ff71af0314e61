"""What a checkpoint folder holds, and the one check that it fits a base model.

Training writes checkpoints (``bioray.train``); scoring, ``jobs/evaluate.py``, export and resume
read them. The file names and the checks they share live here, so each reader agrees with the
writer and with the others.

A LoRA checkpoint holds the adapter (``adapter_model.safetensors``, ``adapter_config.json``,
loadable by peft alone); a full fine-tune's holds the whole model (``config.json``,
``model.safetensors``). Both hold the tokenizer, ``bioray.yaml`` (the resolved config) and
``trainer_state.json`` (step, and the base model the weights were trained from).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import yaml

from bioray._version import __version__
from bioray.errors import CheckpointError

CONFIG_FILE = "bioray.yaml"
STATE_FILE = "trainer_state.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer_config.json",)
# What resuming needs besides the weights, beside them in the same folder: DeepSpeed's own
# checkpoint (optimizer moments and LR schedule, each rank its ZeRO partition) and each rank's
# random state. peft and transformers never look in here.
RESUME_DIR = "resume"
DEEPSPEED_TAG = "deepspeed"
# Keys that may differ between a run and its resumption: where it runs and what it prints, how it
# is scored and searched, how often it reports; everything else decides what is trained.
NOT_TRAINING_KEYS = ("run.dir", "run.storage", "run.name", "run.resume", "run.quiet", "data.cache_dir",
                     "data.tokenise_batch_size", "data.tokenise_tasks", "data.tokenise_cpus", "corpus.shard_mib",
                     "train.max_failures", "train.keep_checkpoints", "train.report_every", "train.cpus_per_worker",
                     "eval", "tune", "track")


def checksums_file(rank: int) -> str:
    """The ``sha256sum``-format list of the files rank ``rank`` wrote into a checkpoint."""
    return f"checksums-rank{rank:03d}.sha256"


def write_checksums(directory: str | Path, rank: int) -> None:
    """Lists every file in ``directory`` with its sha256 (each rank writes its own part of a checkpoint)."""
    d = Path(directory)
    lines = [f"{_sha256(p)}  {p.relative_to(d).as_posix()}\n" for p in sorted(d.rglob("*"))
             if p.is_file() and not p.name.startswith("checksums-rank")]
    (d / checksums_file(rank)).write_text("".join(lines), encoding="utf-8")


def verify(directory: str | Path) -> None:
    """Checks every file a checkpoint's checksum lists name: present, and the same bytes.

    A checkpoint written before checksums existed has no lists and passes unchecked.

    Raises:
        CheckpointError: naming the first file that is missing or differs.
    """
    d = Path(directory)
    for listing in sorted(d.glob("checksums-rank*.sha256")):
        for line in listing.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.partition("  ")
            path = d / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from the checkpoint (listed in {listing.name})")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted or was changed after "
                                      f"the checkpoint was written")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def rng_file(rank: int) -> str:
    """Each rank's random state (dropout masks), inside :data:`RESUME_DIR`."""
    return f"rng-rank{rank:03d}.safetensors"


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint made after ``step`` optimizer steps."""
    return f"step-{step:06d}"


def is_full(directory: str | Path) -> bool:
    """Whether the folder holds whole model weights (``train.full_finetune``) rather than an adapter."""
    d = Path(directory)
    return (d / "config.json").is_file() and not (d / "adapter_config.json").is_file()


def saves_modules(directory: str | Path) -> bool:
    """Whether an adapter checkpoint also holds modules trained whole (``lora.modules_to_save``)."""
    return bool(_read_json(Path(directory) / "adapter_config.json").get("modules_to_save"))


def checkpoint_base(directory: str | Path) -> str:
    """The base model a checkpoint was trained from, after checking the folder is complete.

    For an adapter, the adapter config's ``base_model_name_or_path``; for full weights, the base
    recorded in ``trainer_state.json`` (the folder itself for checkpoints that predate it).

    Raises:
        CheckpointError: a missing folder or file, or an unreadable adapter config.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder not found")
    check_version(d)
    full = is_full(d)
    for name in (FULL_FILES if full else ADAPTER_FILES) + TOKENIZER_FILES + (CONFIG_FILE,):
        if not (d / name).is_file():
            raise CheckpointError(f"{d}: incomplete checkpoint, {name} is missing")
    if full:
        return _read_json(d / STATE_FILE).get("base_model") or str(d.resolve())
    base = _read_json(d / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{d / 'adapter_config.json'}: no base_model_name_or_path in it")
    return base


def check_version(directory: str | Path) -> None:
    """Refuses a checkpoint written by a newer bioray than this one: its files may mean something else.

    The version is ``bioray_version`` in ``trainer_state.json``; a checkpoint without it predates the
    field and is read as before.

    Raises:
        CheckpointError: the checkpoint names a newer bioray version.
    """
    path = Path(directory) / STATE_FILE
    check_made_by(_read_json(path).get("bioray_version"), str(path))


def check_made_by(made: object, where: str) -> None:
    """:func:`check_version` for a version already read (``where`` names the file, a path or a URI)."""
    if isinstance(made, str) and _version_key(made) > _version_key(__version__):
        raise CheckpointError(f"{where}: written by bioray {made}, newer than this bioray {__version__}; "
                              f"upgrade bioray to read it")


def check_revision(directory: str | Path, revision: str | None, named_by: str) -> None:
    """Checks that a checkpoint was trained on the hub revision of its base that the caller will load.

    The revision is ``model.revision`` in the checkpoint's ``bioray.yaml`` (null: the hub's default
    branch, whatever it held then); loading another one would score or merge the adapter on weights it
    was not trained on.

    Raises:
        CheckpointError: the revisions differ, naming both.
    """
    data = _read_yaml(Path(directory) / CONFIG_FILE)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    trained = model.get("revision")
    if trained != revision:
        raise CheckpointError(f"{Path(directory)}: trained on base revision {trained!r}, not {revision!r} "
                              f"({named_by}); set model.revision={trained}" if trained else
                              f"{Path(directory)}: trained on the base's default branch, not revision {revision!r} "
                              f"({named_by}); set model.revision=null")


def _version_key(version: str) -> tuple[int, ...]:
    """``1.10.0rc1`` -> ``(1, 10, 0)``: the release numbers, compared as numbers."""
    key = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        key.append(int(digits))
    return tuple(key)


def check_base(directory: str | Path, expected: str, named_by: str | None = None) -> str:
    """Checks that a checkpoint was made for ``expected``; returns the base it was made for.

    ``expected`` matches when it names the same model as the checkpoint's base (a hub id, or a
    folder that resolves to the same place) or is the ``model.name_or_path`` its ``bioray.yaml``
    was trained with (``tiny``, say, which resolves to a cache folder).

    Args:
        directory: The checkpoint folder.
        expected: A hub id, a folder, or a ``model.name_or_path`` such as ``tiny``.
        named_by: Where ``expected`` came from (a config key, a flag), for the error message.

    Raises:
        CheckpointError: an incomplete checkpoint, or one made for another base model.
    """
    base = checkpoint_base(directory)
    if base_key(expected) != base_key(base) and expected != trained_with(directory):
        raise CheckpointError(f"{Path(directory)}: checkpoint was made for base model {base!r}, not {expected!r}"
                              + (f" ({named_by})" if named_by else ""))
    return base


def check_base_exists(directory: str | Path, base: str) -> None:
    """Checks that a checkpoint's base, where it is a local folder, is still there to load.

    Raises:
        CheckpointError: the base names a folder that no longer exists (a cleared cache, say).
    """
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"{Path(directory)}: its base model folder {base!r} no longer exists; rebuild it "
                              f"with jobs/finetune.py or point model.name_or_path at a copy")


def trained_with(directory: str | Path) -> str | None:
    """``model.name_or_path`` as the checkpoint's ``bioray.yaml`` names it (None if it names none)."""
    model = _read_yaml(Path(directory) / CONFIG_FILE).get("model")
    return model.get("name_or_path") if isinstance(model, dict) else None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a readable bioray config") from None
    return data if isinstance(data, dict) else {}


def first_difference(saved: dict, current: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """The first training key whose value differs between two plain config dicts (``bioray.yaml``).

    Returns:
        ``(dotted key, saved value, current value)``, or None when the run is the same.
    """
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in NOT_TRAINING_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{dotted}.")
            if found:
                return found
        elif a != b:
            return dotted, a, b
    return None


def base_key(path: str) -> str:
    """A base model's identity for comparison: the resolved folder if it exists, else the hub id."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    return data if isinstance(data, dict) else {}
