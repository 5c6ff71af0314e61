"""bioray's temporary folders, named so that a later run can tell a killed run's leftovers from a live one's.

Every stage writes its output into a temporary folder and renames it into place once complete; a run
that is killed leaves that folder behind. Its name says who made it,
``<prefix>.<host>.<pid>.<random>``, so the next run of the same stage removes it once that process is
gone: at once on the same host (the process is checked), after :data:`FOREIGN_AFTER_S` for another
host sharing the folder (where it cannot be checked). A folder whose writer still runs is never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bioray")

# Another host's leftovers go only after a week: its process may still be writing.
FOREIGN_AFTER_S = 7 * 24 * 3600


def prefix(name: str) -> str:
    """The start of a temporary folder's name for this process: ``<name>.<host>.<pid>.``."""
    return f"{name}.{_host()}.{os.getpid()}."


def make(parent: Path, name: str) -> Path:
    """Creates an empty temporary folder ``<parent>/<name>.<host>.<pid>.<random>`` (parent too)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix(name), dir=parent))


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Removes the temporary folders (or files) named by :func:`make` with ``name`` whose writer is gone.

    Returns:
        What was removed.
    """
    parent = Path(parent)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:  # no folder yet, or not readable: nothing of ours there
        return removed
    for entry in entries:
        if entry.name.startswith(f"{name}.") and _stale(entry, entry.name[len(name) + 1:]):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
            log.info("removed %s, left by a run that was killed", entry)
    return removed


def _stale(entry: Path, rest: str) -> bool:
    parts = rest.rsplit(".", 2)  # host names may hold dots; pid and the random part do not
    if len(parts) != 3 or not parts[1].isdigit():
        return False  # not one of ours
    host, pid = parts[0], int(parts[1])
    if host == _host():
        return not _alive(pid)
    try:
        return time.time() - entry.lstat().st_mtime > FOREIGN_AFTER_S
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _host() -> str:
    # Dots are the name's separators; a host name keeps its own, which rsplit in _stale allows for.
    return socket.gethostname().replace("/", "_") or "localhost"
