"""Downloading the public NER corpora the paper used, pinned to upstream commits and checked by sha256.

``bioray data fetch NAME...`` (and ``jobs/fetch_data.py``) call :func:`fetch`. The files come from
Crichton et al.'s MTL-Bioinformatics-2016 repository (CC BY 4.0), where corpus ``NAME`` lives in
``data/<folder>/{train,devel,test}.tsv``; they land in ``<dest>/ner/<NAME>/`` (the layout of
../shared/data), which is what ``${BIORAY_DATA}/ner/...`` paths in configs read.

Each file is streamed into a temporary file beside its destination, checked, and only then renamed
into place: a dropped connection or a wrong checksum leaves no partial file. Files whose sha256 is
not in :data:`REGISTRY` (``None``) are trusted on first use: the first download's sha256 goes into
``<dest>/ner/<NAME>/SHA256SUMS`` (``sha256sum -c`` reads it) and every later fetch is checked
against it. A file already there with its known sha256 is not downloaded again.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bioray import files
from bioray.errors import FetchError

log = logging.getLogger("bioray")

UPSTREAM = "https://raw.githubusercontent.com/cambridgeltl/MTL-Bioinformatics-2016"
"""Base URL of the upstream repository's files; ``--mirror`` replaces it (and the commit)."""
SPLITS = ("train", "devel", "test")
"""The files of every corpus, ``<split>.tsv``, under their upstream names (devel is validation)."""
LOCK = "SHA256SUMS"
"""Per-corpus file of the sha256 of every file fetched (trust-on-first-use record)."""
TIMEOUT_S = 60.0
"""Seconds a connect or a read may wait: a stalled server fails the fetch instead of hanging it."""
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Corpus:
    """One public corpus of the registry."""

    name: str
    """Name on the command line and folder under ``<dest>/ner/``."""
    entity: str
    """What it tags (``entity`` in a config's iob source)."""
    folder: str
    """Its folder in the upstream repository: ``data/<folder>/<split>.tsv``."""
    revision: str
    """The upstream commit its files are pinned to."""
    sha256: dict[str, Optional[str]]
    """Split -> sha256 of the file; None = not known here, trusted on first use."""


# Checksums: computed from the upstream files as copied into ../shared/data/ner (identical in size,
# first and last lines to the upstream copies at these commits). Test splits, BC2GM and JNLPBA
# could not be read byte for byte here (no internet), so they are None: trust on first use.
# Revisions: the commit at which each corpus's files were read upstream.
_NCBI_BC2GM_JNLPBA = "954a98f80c443ea96cc4af742eb0f6a7c89c40a2"
_BC5CDR = "d62961c5750439aec6396f5703f3a1c03d97ebd3"
REGISTRY = {c.name: c for c in (
    Corpus("NCBI-disease", "disease", "NCBI-disease-IOB", _NCBI_BC2GM_JNLPBA, {
        "train": "58379baf4614b8d757d93dd7a21b202849ca99f9b9d71b49185523ff5443300c",
        "devel": "b4e1e7efcc2a35047bf2f3d281648357470e674f555d4a26a0049ac37d59cc61",
        "test": None}),
    Corpus("BC5CDR-chem", "chemical", "BC5CDR-chem-IOB", _BC5CDR, {
        "train": "165c4cd2efadd0caf1bb8f3c6bcd3acca199446bb3d55eb06d9137114c9a0b2d",
        "devel": "3f1df5cfcff95735663ffc37121fd3687e82b1e9a019bec0480491502652721b",
        "test": None}),
    Corpus("BC5CDR-disease", "disease", "BC5CDR-disease-IOB", _BC5CDR, {
        "train": "d630dafe7dd67e21350cc3278dbdcfadcccbb2b63d0fda83b2427853988e5ad9",
        "devel": "8c3af95475029c2100c2b7c0108b2715bc700ac198c7a21d587f11f1d06b17bd",
        "test": None}),
    Corpus("BC2GM", "gene", "BC2GM-IOB", _NCBI_BC2GM_JNLPBA, dict.fromkeys(SPLITS)),
    Corpus("JNLPBA", "protein, DNA, RNA, cell_line or cell_type", "JNLPBA", _NCBI_BC2GM_JNLPBA,
           dict.fromkeys(SPLITS)),
)}


def url(corpus: Corpus, split: str, mirror: Optional[str] = None) -> str:
    """The URL of one file: upstream at the pinned commit, or ``<mirror>/data/<folder>/<split>.tsv``.

    Args:
        corpus: A registry entry.
        split: One of :data:`SPLITS`.
        mirror: Base URL of a copy of the upstream repository's tree (``http(s)://`` or
            ``file://``); None = upstream.
    """
    base = mirror.rstrip("/") if mirror else f"{UPSTREAM}/{corpus.revision}"
    return f"{base}/data/{corpus.folder}/{split}.tsv"


def corpora(names: list[str]) -> list[Corpus]:
    """The registry entries of ``names`` (case-insensitive), checked before anything is fetched.

    Raises:
        FetchError: a name the registry does not know, listing those it knows.
    """
    by_lower = {name.lower(): c for name, c in REGISTRY.items()}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise FetchError(f"unknown corpus {', '.join(map(repr, unknown))}: expected one of {', '.join(REGISTRY)}")
    return list({by_lower[n.lower()].name: by_lower[n.lower()] for n in names}.values())


def fetch(names: list[str], dest: Path, mirror: Optional[str] = None) -> list[Path]:
    """Downloads every split of the named corpora into ``<dest>/ner/<NAME>/`` and checks them.

    Args:
        names: Registry names (``NCBI-disease``, ...).
        dest: The data root (``$BIORAY_DATA`` for configs).
        mirror: Base URL that replaces the upstream repository (see :func:`url`).

    Returns:
        The files, downloaded or already there.

    Raises:
        FetchError: an unknown name, an unreachable URL, a dropped connection or a checksum that
            does not match; the file it names is left as it was.
    """
    out = []
    wanted = corpora(names)
    try:  # before any download: a data root that cannot be written fails in a second, not after one
        Path(dest).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{dest}: cannot write there ({e.strerror}); choose another --dest") from None
    for corpus in wanted:
        folder = Path(dest).expanduser() / "ner" / corpus.name
        trusted = _read_lock(folder / LOCK)
        for split in SPLITS:
            path = folder / f"{split}.tsv"
            pinned = corpus.sha256[split]
            expected = pinned or trusted.get(path.name)
            if path.is_file() and expected is not None:
                if _sha256(path) == expected:
                    log.info("%s: up to date", path)
                    out.append(path)
                    continue
                log.info("%s: sha256 differs from the expected one; downloading it again", path)
            origin = "bioray's registry" if pinned else \
                f"the first download's, in {folder / LOCK}; delete that line to trust a new copy"
            source = url(corpus, split, mirror)
            trusted[path.name] = _download(source, path, expected, origin)
            _write_lock(folder / LOCK, trusted)
            how = "verified" if expected else f"recorded in {LOCK} (trust on first use)"
            log.info("%s: downloaded from %s, sha256 %s", path, source, how)
            out.append(path)
    return out


def _download(source: str, path: Path, expected: Optional[str], origin: str) -> str:
    """Streams ``source`` to a temporary file beside ``path``, checks it, renames it into place.

    Args:
        source: The URL.
        path: Where the file goes.
        expected: Its sha256; None = any (trust on first use).
        origin: Where ``expected`` comes from, for the error.

    Returns:
        The file's sha256.

    Raises:
        FetchError: naming the URL and what went wrong; ``path`` is left as it was.
    """
    digest = hashlib.sha256()

    def write(tmp: Path) -> None:
        received, length = 0, None
        try:
            with urllib.request.urlopen(source, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
                length = response.headers.get("Content-Length")
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    f.write(chunk)
                    received += len(chunk)
        except urllib.error.HTTPError as e:
            raise FetchError(f"{source}: HTTP {e.code} {_one_line(e.reason)}; nothing written") from None
        except urllib.error.URLError as e:
            raise FetchError(f"{source}: cannot open ({_one_line(e.reason)}); nothing written") from None
        except TimeoutError:
            raise FetchError(f"{source}: no data for {TIMEOUT_S:g} s after {received} bytes; "
                             f"nothing written") from None
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(f"{source}: download failed after {received} bytes ({_one_line(e)}); "
                             f"nothing written") from None
        # http.client returns a short body without an error when the server closes early.
        if length is not None and length.isdigit() and received != int(length):
            raise FetchError(f"{source}: connection closed after {received} of {length} bytes; nothing written")
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise FetchError(f"{source}: sha256 {got} does not match {expected} ({origin}); nothing written")

    files.write_via(path, write)
    return digest.hexdigest()


def _one_line(reason: object) -> str:
    """An exception (or urllib's reason) as one line: the contract is one line on stderr."""
    text = str(reason).strip()
    return text.splitlines()[0] if text else type(reason).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _read_lock(path: Path) -> dict[str, str]:
    """``SHA256SUMS`` (``<sha256>  <file>`` lines, as sha256sum writes them) as file -> sha256."""
    if not path.is_file():
        return {}
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise FetchError(f"{path}:{i}: expected '<sha256>  <file>', got {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def _write_lock(path: Path, trusted: dict[str, str]) -> None:
    files.write_text(path, "".join(f"{sha}  {name}\n" for name, sha in sorted(trusted.items())))
