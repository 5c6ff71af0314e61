"""Where a run's checkpoints and results live (a local folder, or object storage every node can reach),
and how a run works without a filesystem shared by its nodes.

``run.storage`` is a local path or any URI pyarrow's filesystems accept (``s3://bucket/prefix``,
``gs://...``); credentials and the endpoint come from the environment as the cloud's own SDKs read
them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or from instance
roles, and never from a bioray file. Each run gets its own folder under it (``run.name``), so runs
and Tune trials never share, overwrite or delete each other's checkpoints.

A URI there also says that the nodes share no filesystem: the tasks that touch the driver's files
run on its node (:func:`file_task_options`), what other nodes must read goes through the bucket
(:func:`publish_folder`, :func:`node_copy`), and a run's result files are copied beside its
checkpoints (docs/cluster.md, "What goes where").
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
    from bioray.tempdirs import prefix

    # Named for its process, so a killed run's download is removed by the next job (bioray.cli).
    with tempfile.TemporaryDirectory(prefix=prefix("bioray-download")) as tmp:
        dest = Path(tmp) / _folder_name(uri_or_path)
        _download(uri_or_path, dest)
        yield dest


def _folder_name(uri: str) -> str:
    """The last part of a folder's URI (``s3://b/runs/x/`` -> ``x``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _download(uri: str, dest: Path) -> None:
    """Copies the folder at ``uri`` (recursively) into the new local folder ``dest``.

    Raises:
        CheckpointError: there is no folder at ``uri``.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        from bioray.errors import CheckpointError

        raise CheckpointError(f"{uri}: checkpoint folder not found")
    for rel in _files_under(fs, path):
        # Object stores list files, not folders: make each file's folder here first.
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{path}/{rel}") as src, open(dest / rel, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)


def _files_under(fs, path: str) -> list[str]:
    """Every file below ``path``, relative to it."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def shared_filesystem(storage: str | None) -> bool:
    """Whether every node is taken to see the driver's files (``run.dir``, the cache, the sources).

    Yes without ``run.storage`` or with a local path there (a laptop, or a filesystem mounted on every
    node); no with a URI: then nothing a task on another node reads may be a driver file (see
    :func:`file_task_options`, :func:`publish_folder`).
    """
    return not (storage and is_uri(storage))


def file_task_options(storage: str | None, num_cpus: float, node: str | None = None) -> dict:
    """``ray.remote`` options for a task that reads or writes the driver's files (corpus, cache).

    With a shared filesystem: anywhere, ``num_cpus`` each. Without one (``run.storage`` a URI): on
    ``node`` (default: this process's node; a Tune trial passes the driver's), where those files are. A
    node that offers no CPU to Ray (a cluster's head, which keeps its cores for the driver and Ray
    itself) runs them asking none, or they would wait forever.
    """
    if shared_filesystem(storage):
        return {"num_cpus": num_cpus}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = node or ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node), 0.0)
    return {"num_cpus": num_cpus if cpus >= num_cpus else 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def upload(local: str | Path, uri: str) -> None:
    """Copies a local file or folder (recursively) to ``uri``, replacing what is there file by file."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    local = Path(local)
    if local.is_file():
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def exists(uri_or_path: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri_or_path)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


PUBLISHED = ".bioray-published"
"""Written last into a folder :func:`publish_folder` uploads: its presence marks a whole copy."""


def publish_folder(local: str | Path, storage: str, kind: str) -> str:
    """Uploads a local folder that other nodes must read (a built base model) under ``<storage>/_shared``.

    Named by the folder's name and a digest of its files' names, sizes and times, so the same folder
    is uploaded once however many runs use it, and a changed one gets a new name.

    Returns:
        The folder's URI (``<storage>/_shared/<kind>/<name>-<digest>``).
    """
    import hashlib

    local = Path(local).resolve()
    h = hashlib.sha256()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(local)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    uri = f"{storage.rstrip('/')}/_shared/{kind}/{local.name}-{h.hexdigest()[:12]}"
    if not exists(f"{uri}/{PUBLISHED}"):
        upload(local, uri)
        fs, path = filesystem(uri)
        with fs.open_output_stream(f"{path}/{PUBLISHED}") as out:
            out.write(b"complete\n")
    return uri


def node_copy(path: str, uri: str | None) -> str:
    """A folder to load from on this node: ``path`` where this node sees it, else a cached download of ``uri``.

    The download goes to ``<temp>/bioray-shared/<last part of uri>`` once per node (workers of one node
    share it; a half-finished download is never used: it is renamed into place when whole).
    """
    if uri is None or Path(path).is_dir() or not Path(path).is_absolute():
        return path  # a hub id, or a folder this node sees
    import os
    import shutil
    import uuid

    dest = Path(tempfile.gettempdir()) / "bioray-shared" / _folder_name(uri)
    if (dest / PUBLISHED).is_file():
        return str(dest)
    staged = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    staged.mkdir(parents=True)
    try:
        _download(uri, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    try:
        os.rename(staged, dest)
    except OSError:  # another worker of this node got there first
        shutil.rmtree(staged, ignore_errors=True)
    return str(dest)


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
