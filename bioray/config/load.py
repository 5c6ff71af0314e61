"""Reading a config: YAML files, ``--set`` overrides, and the plain dict <-> dataclass form.

A config is built as defaults <- YAML <- ``--set`` (:func:`load`); :func:`from_dict` turns the
raw dict into the schema's dataclasses, checking every key and type on the way (then
``Config.__post_init__`` checks the values). :func:`to_dict` is the plain form that crosses
process boundaries (Ray Train's ``train_loop_config``, Tune's ``param_space``) and :func:`dump`
the YAML written as ``bioray.yaml``. Old key names still load, with a warning (:data:`RENAMED`).

``--config`` takes a file or the name of a config shipped in the package (:func:`config_file`), and
``${BIORAY_DATA}`` in a source's file paths stands for the data root (:func:`data_root`), where
``bioray data fetch`` writes the public corpora.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from bioray.config.schema import Config
from bioray.config.validate import fail
from bioray.errors import ConfigError

# The recipes' YAML files, shipped inside the package (the top-level configs/ holds the same
# files for a checkout; tests/test_commands.py keeps them identical).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA_ENV = "BIORAY_DATA"
DATA_VAR = "${%s}" % DATA_ENV  # what source paths write to mean the data root


def data_root() -> Path:
    """Where the public corpora live: ``$BIORAY_DATA``, else ``$XDG_DATA_HOME/bioray``
    (``~/.local/share/bioray`` without XDG_DATA_HOME).

    ``bioray data fetch`` writes there and ``${BIORAY_DATA}`` in a source's file paths reads
    from there, so a config written against ``BIORAY_DATA=../shared/data`` works unchanged
    after a fetch into the default root.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home).expanduser().resolve() / "bioray"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``quickstart``, ``ner-real``, ...)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def config_file(name_or_path: str | Path) -> Path:
    """The YAML file ``--config`` means: a file that exists, else a packaged config of that name.

    A bare name (``quickstart`` or ``quickstart.yaml``, no folder) that is not a file here
    names a config shipped in the package, so ``--config quickstart`` works from any folder
    after ``pip install``. Anything else is returned as given (reading it then fails naming it).
    """
    path = Path(name_or_path)
    if path.is_file() or path.parent != Path("."):
        return path
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return packaged if packaged.is_file() else path


def type_name(tp: Any) -> str:
    """A field type in words, as errors and docs/config.md say it (``an integer or null``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
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
        fail(key, type_name(tp), value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            fail(key, type_name(tp), value)
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, type_name(tp), value)
        ktp, vtp = typing.get_args(tp)
        return {_convert(k, ktp, key): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, "true/false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `2e-4` (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                fail(key, "a number", value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(prefix or "<top level>", "a mapping", data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    data = _renamed(data, prefix)
    for k in data:
        if k not in known:
            full = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"config key '{full}': unknown key (expected one of: {', '.join(sorted(known))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


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

    ``${BIORAY_DATA}`` in a source's file paths (and dataset) becomes the data root (:func:`data_root`).

    Raises:
        ConfigError: naming the first unknown key, wrong type or bad value.
    """
    cfg = _build(Config, data, "")
    if any(DATA_VAR in path for s in cfg.corpus.sources for path in [*s.files.values(), s.dataset or ""]):
        root = str(data_root())
        for s in cfg.corpus.sources:
            s.files = {split: path.replace(DATA_VAR, root) for split, path in s.files.items()}
            s.dataset = s.dataset.replace(DATA_VAR, root) if s.dataset else s.dataset
    return cfg


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
        bare = path.parent == Path(".")
        also = f" (nor a packaged config: {', '.join(packaged_configs())})" if bare else ""
        raise ConfigError(f"{path}: config file not found{also}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        # An unclosed bracket or quote is reported where the file ends: say where it was opened too.
        opened = f"; {e.context} on line {context.line + 1}" if mark and context and context.line != mark.line \
            and getattr(e, "context", None) else ""
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)}{opened})") from None
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
        path: YAML file, or the name of a packaged config (:func:`config_file`); None = no
            file (defaults only).
        overrides: ``KEY=VALUE`` strings, applied in order.

    Raises:
        ConfigError: on any unknown key, wrong type or invalid value.
    """
    data = read_yaml(config_file(path)) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def dump(cfg: Config) -> str:
    """The resolved config as YAML text (what bioray.yaml holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
