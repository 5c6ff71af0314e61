"""`bioray data fetch` against a local HTTP server on 127.0.0.1 that serves ../shared/data in the upstream layout.

The real download code runs (urllib, temp file, checksum, rename); only the base URL is the test's
(``--mirror``). The server counts requests, and can corrupt a file or drop the connection mid-body.
"""

import dataclasses
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bioray import fetch
from conftest import ROOT

TIMEOUT_S = 60  # every subprocess is bounded
STALL_S = 3.0  # a stalled server's pause, well past the client timeout the test sets


class _Upstream(http.server.ThreadingHTTPServer):
    """Serves ``/data/<upstream folder>/<split>.tsv`` from ../shared/data/ner/<NAME>/<split>.tsv."""

    daemon_threads = True

    def __init__(self, shared: Path, mode: str = "ok"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = {f"/data/{c.folder}/{split}.tsv": shared / "ner" / c.name / f"{split}.tsv"
                      for c in fetch.REGISTRY.values() for split in fetch.SPLITS}
        self.mode = mode  # ok | corrupt (one byte changed) | drop (half the body, then close) | stall
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Upstream

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        path = self.server.files.get(self.path)
        if path is None or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if self.server.mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.mode in ("drop", "stall"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if self.server.mode == "stall":
                time.sleep(STALL_S)  # longer than the client's timeout in the test
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def upstream(shared_data):
    servers = []

    def start(mode: str = "ok") -> _Upstream:
        server = _Upstream(shared_data, mode)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _fetch(*args, cwd: Path):
    """``python -m bioray data fetch ARGS`` (the installed command's code), as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bioray", "data", "fetch", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture
def only_train_and_devel(monkeypatch):
    """In-process fetches of the two splits ../shared/data has (its test splits are not there)."""
    monkeypatch.setattr(fetch, "SPLITS", ("train", "devel"))


def test_fetch_through_a_mirror_gives_the_upstream_bytes_and_a_rerun_asks_nothing(
        upstream, shared_data, tmp_path, only_train_and_devel):
    server = upstream()
    paths = fetch.fetch(["ncbi-disease"], tmp_path, mirror=server.url + "/")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == \
        ["ner/NCBI-disease/train.tsv", "ner/NCBI-disease/devel.tsv"]
    for p in paths:
        assert p.read_bytes() == (shared_data / "ner" / "NCBI-disease" / p.name).read_bytes()
    assert sorted(server.requests) == ["/data/NCBI-disease-IOB/devel.tsv", "/data/NCBI-disease-IOB/train.tsv"]
    lock = (tmp_path / "ner" / "NCBI-disease" / fetch.LOCK).read_text()
    assert lock == "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(paths))
    assert sorted(os.listdir(tmp_path / "ner" / "NCBI-disease")) == [fetch.LOCK, "devel.tsv", "train.tsv"]

    fetch.fetch(["NCBI-disease"], tmp_path, mirror=server.url)
    assert len(server.requests) == 2  # both files known and intact: not asked for again


def test_the_registry_checksums_are_those_of_the_shared_copies(shared_data):
    # ../shared/data/ner holds the upstream train/devel files; their sha256 is the registry's.
    for corpus in fetch.REGISTRY.values():
        for split in ("train", "devel"):
            path = shared_data / "ner" / corpus.name / f"{split}.tsv"
            if path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == corpus.sha256[split], path
    assert {c.name for c in fetch.REGISTRY.values() if all(c.sha256[s] for s in ("train", "devel"))} == \
        {"NCBI-disease", "BC5CDR-chem", "BC5CDR-disease"}


def test_a_file_without_a_known_checksum_is_trusted_on_first_use_then_held_to_it(
        upstream, shared_data, tmp_path, monkeypatch, only_train_and_devel):
    # BC2GM has no checksum in the registry; stand its files in with NCBI-disease's bytes.
    server = upstream()
    monkeypatch.setitem(fetch.REGISTRY, "BC2GM", dataclasses.replace(fetch.REGISTRY["BC2GM"], folder="NCBI-disease-IOB"))
    fetch.fetch(["BC2GM"], tmp_path, mirror=server.url)
    folder = tmp_path / "ner" / "BC2GM"
    first = (folder / fetch.LOCK).read_text()
    assert "  train.tsv\n" in first and "  devel.tsv\n" in first

    (folder / "train.tsv").write_text("changed locally\n")  # not what was trusted: fetched again
    fetch.fetch(["BC2GM"], tmp_path, mirror=server.url)
    assert len(server.requests) == 3
    assert (folder / "train.tsv").read_bytes() == (shared_data / "ner" / "NCBI-disease" / "train.tsv").read_bytes()

    (folder / "train.tsv").unlink()
    server.mode = "corrupt"  # upstream changed under us: refused, the first download's sha256 holds
    with pytest.raises(fetch.FetchError, match="does not match .*first download"):
        fetch.fetch(["BC2GM"], tmp_path, mirror=server.url)
    assert (folder / fetch.LOCK).read_text() == first
    assert sorted(os.listdir(folder)) == [fetch.LOCK, "devel.tsv"]


@pytest.mark.parametrize("mode,says", [("corrupt", "sha256 [0-9a-f]{64} does not match"),
                                       ("drop", r"connection closed after \d+ of \d+ bytes")])
def test_a_bad_download_exits_2_with_one_line_and_leaves_no_file(upstream, tmp_path, mode, says):
    server = upstream(mode)
    proc = _fetch("NCBI-disease", "--mirror", server.url, "--dest", tmp_path / "data", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bioray: error: ") and f"{server.url}/data/NCBI-disease-IOB/train.tsv" in lines[0]
    assert re.search(says, lines[0]), lines[0]
    folder = tmp_path / "data" / "ner" / "NCBI-disease"
    assert not folder.exists() or os.listdir(folder) == []  # no partial file, no temporary file


def test_a_stalled_server_fails_after_the_timeout_and_leaves_no_file(upstream, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "TIMEOUT_S", 0.5)
    server = upstream("stall")
    start = time.monotonic()
    with pytest.raises(fetch.FetchError, match=r"train.tsv: no data for 0.5 s after \d+ bytes"):
        fetch.fetch(["NCBI-disease"], tmp_path, mirror=server.url)
    assert time.monotonic() - start < STALL_S
    assert os.listdir(tmp_path / "ner" / "NCBI-disease") == []


def test_an_unknown_name_exits_2_listing_the_known_ones(tmp_path):
    proc = _fetch("NCBI-disease", "NCBI-diseases", "--dest", tmp_path / "data", "--mirror", "http://127.0.0.1:9",
                  cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'NCBI-diseases'" in lines[0], proc.stderr
    assert all(name in lines[0] for name in fetch.REGISTRY)
    assert not (tmp_path / "data").exists()  # names are checked before anything is fetched


def test_the_job_script_fetches_into_bioray_data_and_says_where(upstream, tmp_path, monkeypatch):
    # jobs/fetch_data.py is the same command; without --dest it writes to $BIORAY_DATA. The mirror
    # has no test splits (../shared/data holds none): the first missing file ends the fetch.
    server = upstream()
    env = {**os.environ, "BIORAY_DATA": str(tmp_path / "root")}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "fetch_data.py"), "BC5CDR-chem", "--mirror", server.url],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("/data/BC5CDR-chem-IOB/test.tsv: HTTP 404 Not Found; nothing written"), proc.stderr
    folder = tmp_path / "root" / "ner" / "BC5CDR-chem"
    assert sorted(os.listdir(folder)) == [fetch.LOCK, "devel.tsv", "train.tsv"]
    assert "devel.tsv: downloaded from" in proc.stdout and "sha256 verified" in proc.stdout


def test_upstream_urls_are_pinned_to_a_commit():
    for corpus in fetch.REGISTRY.values():
        assert len(corpus.revision) == 40 and set(fetch.SPLITS) == set(corpus.sha256)
    assert fetch.url(fetch.REGISTRY["JNLPBA"], "test") == \
        f"{fetch.UPSTREAM}/954a98f80c443ea96cc4af742eb0f6a7c89c40a2/data/JNLPBA/test.tsv"
    assert fetch.url(fetch.REGISTRY["BC2GM"], "devel", "https://mirror.example/mtl/") == \
        "https://mirror.example/mtl/data/BC2GM-IOB/devel.tsv"
