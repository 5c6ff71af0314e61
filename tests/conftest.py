"""Shared fixtures: the project root, the real data folder, and one local Ray per session."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The e2e runs log to a local MLflow file store, which MLflow 3 refuses without it (tracker_sets).
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# The data root that ${BIORAY_DATA} in configs (configs/ner-real.yaml) reads: the real data here.
os.environ.setdefault("BIORAY_DATA", str(SHARED_DATA))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the project)")
    return SHARED_DATA


def tracker_sets(folder: Path) -> list[str]:
    """``--set`` arguments that turn on each installed tracker for an e2e run: MLflow to a file store
    at ``folder/mlruns``, W&B offline (into ``run.dir/wandb/``)."""
    import importlib.util

    sets = []
    if importlib.util.find_spec("mlflow"):
        sets += ["track.mlflow.enabled=true", f"track.mlflow.tracking_uri=file:{folder / 'mlruns'}"]
    if importlib.util.find_spec("wandb"):
        sets += ["track.wandb.enabled=true", "track.wandb.mode=offline"]
    return [a for s in sets for a in ("--set", s)]


def run_job(*args, env=None, timeout=900):
    """Runs a job script from the project root, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def rescore(best: Path, corpus_dir: Path) -> dict:
    """Scores a checkpoint folder again outside the run: peft's own loading, bioray's batching and decoding.

    Returns:
        ``{source: {metric: value}}`` on the checkpoint's own eval records.
    """
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bioray.config import load
    from bioray.corpus import read_manifest
    from bioray.evaluate.generate import Generator
    from bioray.evaluate.pool import eval_items, score_predictions

    cfg = load(best / "bioray.yaml")
    base = json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(best)).eval()
    torch.set_num_threads(1)
    gen = Generator(base, cfg)
    gen.model = model
    items = eval_items(cfg, corpus_dir)
    tok = gen.tokenizer
    max_new = [int(len(x) * 1.5) + 8 for x in tok([i["output"] for i in items], add_special_tokens=False)["input_ids"]]
    answers = gen.generate(gen.prompts(items), max_new, cfg.eval.batch_size)
    return score_predictions(cfg, read_manifest(corpus_dir), items, {i["id"]: a for i, a in zip(items, answers)})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One bioray cache per test session: the tiny base is built once, shared by the job tests."""
    return tmp_path_factory.mktemp("bioray-cache")


# Fake credentials planted in the environment of the e2e runs (tests/test_e2e.py, tests/test_tune.py),
# which then read every byte those runs write and print for them. None of them is used by a local run:
# run.storage is a local folder, the model is built locally, nothing is downloaded.
PLANTED_SECRETS = {
    "HF_TOKEN": "hf_bioraySecretScanToken01",
    "AWS_ACCESS_KEY_ID": "AKIABIORAYSCAN000001",
    "AWS_SECRET_ACCESS_KEY": "bioray/Scan+Secret=01",
    "AWS_ENDPOINT_URL": "http://scanuser:scanpass@127.0.0.1:9/",
    # Read by the trackers the quickstart turns on (a local MLflow file store and W&B offline use neither).
    "WANDB_API_KEY": "wandbBiorayScanKey000000000000000000000001",
    "MLFLOW_TRACKING_TOKEN": "mlflowBiorayScanToken01",
}


def secret_forms() -> set[str]:
    """Each planted secret as it could leak: as is, URL-encoded, base64 (the endpoint's user and password too)."""
    import base64
    from urllib.parse import quote

    values = [v for k, v in PLANTED_SECRETS.items() if k != "AWS_ENDPOINT_URL"] + ["scanuser", "scanpass"]
    return {form for v in values for form in (v, quote(v, safe=""), base64.b64encode(v.encode()).decode().rstrip("="))}


def assert_no_secrets(folders, texts=()) -> int:
    """Reads every file under ``folders`` and every text in ``texts``; fails naming where a secret shows.

    Returns:
        The number of files read (so a caller can check the scan saw something).
    """
    forms = [f.encode() for f in secret_forms()]
    found, n = [], 0
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                n += 1
                data = path.read_bytes()
                found += [f"{path}: {f.decode()}" for f in forms if f in data]
    for i, text in enumerate(texts):
        found += [f"output {i}: {f.decode()}" for f in forms if f in text.encode()]
    assert not found, "planted secrets leaked:\n" + "\n".join(found[:20])
    return n


# ------------------------------------------------------- private Ray clusters and an S3 server

def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_cli() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else "ray"


def kill_leftovers(marker: str) -> None:
    """Kill our own processes whose command line names this test's private folder (job drivers
    run in a session of their own, outside the `ray start` process group)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            if p.info["uids"] and p.info["uids"].real == os.getuid() and marker in " ".join(p.info["cmdline"] or []):
                if p.pid != os.getpid():
                    p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


_MARK = "@@bioray-test@@ "


def ask_cluster(env: dict, expr: str, address: str | None = None):
    """The JSON value of ``expr`` evaluated in a fresh driver of a private cluster, read from its marked
    line: the driver's stdout also carries what Ray prints for it (autoscaler events such as
    "(autoscaler +0s) Removing 1 nodes"), so its last line is not necessarily ``expr``'s."""
    init = f"ray.init(address={address!r}, logging_level='ERROR')" if address else "ray.init(logging_level='ERROR')"
    code = f"import json, os, ray; {init}; print({_MARK!r} + json.dumps({expr}), flush=True)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x[len(_MARK):] for x in out.stdout.splitlines() if x.startswith(_MARK)]
    assert len(lines) == 1, out.stdout[-3000:]
    return json.loads(lines[0])


def cluster_nodes(address: str, env: dict) -> list[dict]:
    """Each node Ray knows of (dead ones too): ``{"alive": bool, "cpu": float}``."""
    return ask_cluster(env, "[{'alive': n['Alive'], 'cpu': n['Resources'].get('CPU', 0)} for n in ray.nodes()]",
                       address)


BUCKET = "bioray-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket, ``s3://bioray-test``; credentials and endpoint only in
    the environment (the processes a test starts inherit them)."""
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_ray(procs: list, base: Path, logs: list = ()) -> None:
    """Stops private ``ray start --block`` processes and everything they started, then removes ``base``.

    SIGTERM first (``--block``: each stops what it started), 5 s for that, then the process groups, then any
    process of ours that names ``base`` (job drivers run in sessions of their own, outside the groups). A
    graceful stop can take half a minute; a test's private Ray holds nothing worth the wait (teardowns
    took 15 s each with 15 s given).
    """
    import shutil
    import signal

    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    kill_leftovers(str(base))
    for f in logs:
        f.close()
    shutil.rmtree(base, ignore_errors=True)
# ------------------------------------------------------------------------ what trackers recorded


def mlflow_runs(store: Path, experiment: str = "bioray") -> list:
    """The MLflow runs of an experiment in a local file store, read back with MLflow's own client."""
    import mlflow

    client = mlflow.MlflowClient(Path(store).as_uri())
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def mlflow_history(store: Path, run_id: str, key: str) -> dict[int, float]:
    """``{step: value}`` of one metric of an MLflow run."""
    import mlflow

    return {m.step: m.value for m in mlflow.MlflowClient(Path(store).as_uri()).get_metric_history(run_id, key)}


def wandb_offline_runs(folder: Path) -> list[dict]:
    """Every offline W&B run under ``folder``, read from its ``run-*.wandb`` file with wandb's own
    protobuf records: ``{"id", "name", "group", "project", "config", "history", "summary", "exit_code"}``.

    The file is a LevelDB-style log (wandb-core writes it; the Python SDK no longer reads it): a
    7-byte header (``:W&B``, magic, version), then 32 KiB blocks of records, each a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    def values(items) -> dict:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}

    runs = []
    for path in sorted(Path(folder).rglob("run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        run = {"history": [], "summary": {}, "config": {}, "exit_code": None}
        pos, buf = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if left >= 7 else (0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left  # the block's zero padding
                continue
            buf += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                which = record.WhichOneof("record_type")
                if which == "run":
                    r = record.run
                    run.update(id=r.run_id, name=r.display_name, group=r.run_group, project=r.project)
                    run["config"].update(values(r.config.update))
                elif which == "config":
                    run["config"].update(values(record.config.update))
                elif which == "history":
                    run["history"].append(values(record.history.item))
                elif which == "summary":
                    run["summary"].update(values(record.summary.update))
                elif which == "exit":
                    run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs
