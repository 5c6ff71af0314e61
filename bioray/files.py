"""Writing files so that a reader never sees half of one: every stage's outputs go through here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_text(path: Path, text: str) -> None:
    """Writes text under a temporary name in the same folder, then renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    """:func:`write_text` for JSON."""
    write_text(path, json.dumps(data, indent=2))


def write_via(path: Path, write: Callable[[Path], None]) -> None:
    """Atomic writes for writers that want a file name (matplotlib's ``savefig``, say).

    ``write`` gets a temporary path beside ``path`` (same suffix, so format detection works);
    what it wrote is renamed onto ``path``, and removed if it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
