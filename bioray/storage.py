"""Where a run's checkpoints live: a local folder, or object storage every node can reach.

``run.storage`` is a local path or any URI pyarrow's filesystems accept (``s3://bucket/prefix``,
``gs://...``); credentials and the endpoint come from the environment as the cloud's own SDKs read
them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or from instance
roles, and never from a bioray file. Each run gets its own folder under it (``run.name``), so runs
and Tune trials never share, overwrite or delete each other's checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import tempfile
from pathlib import Path
from typing import Iterator

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_uri(path: str) -> bool:
    """Whether ``path`` names object storage (``scheme://...``) rather than a local folder."""
    return "://" in path and not path.startswith("file://")


def run_root(run_dir: str, storage: str | None, name: str | None) -> str:
    """The folder that holds this run's ``checkpoints/``: ``run.dir``, or ``<storage>/<name>``.

    ``name`` defaults to the last part of ``run_dir``.
    """
    if not storage:
        return str(Path(run_dir).expanduser().resolve())
    name = name or Path(run_dir).expanduser().resolve().name
    return storage.rstrip("/") + "/" + name if is_uri(storage) else str(Path(storage).expanduser().resolve() / name)


def filesystem(uri_or_path: str):
    """``(pyarrow filesystem, path inside it)`` for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_uri(uri_or_path):
        return pafs.LocalFileSystem(), str(Path(uri_or_path.removeprefix("file://")).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri_or_path)


def full_uri(path: str, storage: str | None) -> str:
    """A path Ray Train reports (no scheme on object storage) as a URI another process can open."""
    if storage and is_uri(storage):
        scheme = storage.split("://", 1)[0]
        return path if "://" in path else f"{scheme}://{path.lstrip('/')}"
    return str(Path(path).resolve())


def checkpoints(root: str) -> list[str]:
    """The ``step-NNNNNN`` folders under ``<root>/checkpoints`` (a URI or path), newest first."""
    import pyarrow.fs as pafs

    fs, base = filesystem(root)
    selector = pafs.FileSelector(f"{base}/{CHECKPOINTS}", allow_not_found=True)
    steps = sorted(((int(m.group(1)), info.path) for info in fs.get_file_info(selector)
                    if info.type == pafs.FileType.Directory and (m := _STEP_DIR.match(info.base_name))), reverse=True)
    return [full_uri(path, root) if is_uri(root) else path for _, path in steps]


def latest_checkpoint(root: str) -> str | None:
    """The newest ``step-NNNNNN`` folder under ``<root>/checkpoints``, or None."""
    found = checkpoints(root)
    return found[0] if found else None


def read_text(uri_or_path: str) -> str:
    """A small file's text, from a local path or a URI."""
    fs, path = filesystem(uri_or_path)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def move_aside(root: str) -> str | None:
    """Renames ``<root>/checkpoints`` to ``checkpoints.replaced-<UTC time>`` (nothing is deleted).

    Returns:
        The new location, or None when there was nothing to move.
    """
    import pyarrow.fs as pafs

    fs, base = filesystem(root)
    src = f"{base}/{CHECKPOINTS}"
    if fs.get_file_info(src).type == pafs.FileType.NotFound:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dst = f"{src}.replaced-{stamp}"
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
    else:  # object stores have no folders to rename: copy every object, then remove the originals
        for rel in _files_under(fs, src):
            fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
        fs.delete_dir(src)
    return full_uri(dst, root) if is_uri(root) else dst


@contextlib.contextmanager
def local_copy(uri_or_path: str) -> Iterator[Path]:
    """A checkpoint folder on local disk: the folder itself, or a temporary download of a URI."""
    if not is_uri(uri_or_path):
        yield Path(uri_or_path.removeprefix("file://")).expanduser().resolve()
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(uri_or_path)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        from bioray.errors import CheckpointError

        raise CheckpointError(f"{uri_or_path}: checkpoint folder not found")
    from bioray.tempdirs import prefix

    # Named for its process, so a killed run's download is removed by the next job (bioray.cli).
    with tempfile.TemporaryDirectory(prefix=prefix("bioray-download")) as tmp:
        dest = Path(tmp) / Path(path).name
        for rel in _files_under(fs, path):
            # Object stores list files, not folders: make each file's folder here first.
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{path}/{rel}") as src, open(dest / rel, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
        yield dest


def _files_under(fs, path: str) -> list[str]:
    """Every file below ``path``, relative to it."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def check_storage(uri: str | None) -> None:
    """Checks ``run.storage`` before anything starts: a scheme pyarrow can open and, for object
    storage, a bucket that answers (an endpoint typo fails here, not at the first checkpoint).

    Credentials are not checked here (the config refuses them in the URI); what pyarrow's error
    says is redacted, since it may quote the endpoint's user.

    Raises:
        ConfigError: naming ``run.storage``.
    """
    if not uri or not is_uri(uri):
        return
    import pyarrow.fs as pafs

    from bioray.errors import ConfigError
    from bioray.redact import redact

    scheme = uri.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except ValueError:  # pyarrow.ArrowInvalid: "Unrecognized filesystem type in URI"
        raise ConfigError(f"config key 'run.storage': unknown scheme '{scheme}://' in {uri!r} (expected a local "
                          f"folder, or a URI pyarrow opens: s3://, gs://, abfs://, hdfs://)") from None
    except OSError as e:
        raise ConfigError(f"config key 'run.storage': cannot open {uri!r}: {_reason(e)}") from None
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        raise ConfigError(redact(f"config key 'run.storage': cannot reach {uri!r}{_endpoint()}: {_reason(e)}")) \
            from None
    if not found:
        raise ConfigError(f"config key 'run.storage': bucket {bucket!r} does not exist{_endpoint()}")


def _endpoint() -> str:
    import os

    from bioray.redact import redact

    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {redact(url)} from the environment)" if url else ""


def _reason(e: Exception) -> str:
    """A library's error in one short line, secrets masked."""
    from bioray.redact import redact

    text = " ".join(str(e).split())
    # pyarrow's S3 errors: "When ...: AWS Error NETWORK_CONNECTION during HeadBucket operation: ...; Details: ..."
    text = text.split("AWS Error ", 1)[-1].split("; Details:", 1)[0]
    return redact(text[:200])
