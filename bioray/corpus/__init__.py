"""The corpus stage: source files -> instruction records -> Parquet shards + manifest.

``build`` writes a corpus, ``read`` reads one back, ``templates`` holds the instructions and the
prompt layout (rendered and encoded the same way for training and for scoring), ``sources`` the
parsers and the checks on source files, ``sample`` the embedded sample corpus.

The names below load on first use: ``build`` and ``read`` import Ray, and a job checks its inputs
(``sources``, ``sample``, ``templates``) before Ray starts, so a typo costs a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CORPUS_VERSION": "build", "build_corpus": "build", "content_hash": "build",
    "corpus_dataset": "read", "read_manifest": "read", "read_records": "read", "read_row_groups": "read",
    "CHAT": "templates", "PromptFormat": "templates", "instruction_set": "templates", "render_prompt": "templates",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'bioray.corpus' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bioray.corpus.{_WHERE[name]}"), name)
