"""docs/config.md: every config key with its type, default and meaning, generated from the schema.

The meaning is the docstring under each field of :mod:`bioray.config.schema`, read from its
source, so the reference cannot drift from the code; a test compares docs/config.md with
:func:`reference_markdown`. Regenerate with ``python -m bioray.config > docs/config.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing

from bioray.config.load import type_name
from bioray.config.schema import Config, SourceConfig


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """docs/config.md: every key with its type, default and docstring, generated from the schema."""
    lines = ["# Config reference", "",
             "Generated from `bioray/config/schema.py` (`python -m bioray.config > docs/config.md`); a test keeps",
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
            rows.append(f"| `{prefix}{f.name}` | {type_name(tp)} | `{shown}` | {doc} |")
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
        lines.append(f"| `{f.name}` | {type_name(hints[f.name])} | `{shown}` | {docs.get(f.name, '')} |")
    lines += ["", "## `tune`", "", _field_docs(Config).get("tune", ""), ""]
    return "\n".join(lines)
