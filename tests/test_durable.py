"""A run on a cluster with no shared filesystem: two Ray nodes, a bucket, a killed worker.

One machine plays a two-node cluster. The head offers no CPU (as cluster.yaml's does): it holds the
driver, its folder and Ray's own processes. The second node offers the CPUs, so every training
worker and scorer runs there; it starts from another working directory and, where the kernel lets
a test make a mount namespace (``unshare -m``), sees the driver's folder as an empty tmpfs: a file
the driver wrote cannot be read there. ``run.storage`` is a bucket on a local S3-compatible server
(moto). A training worker is SIGKILLed after a checkpoint; the run must resume from the bucket by
itself, and its best checkpoint, read back from the bucket, must load with peft and give the
run's scores.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, ask_cluster, cluster_nodes, free_ports, ray_cli, rescore, stop_ray

pytestmark = pytest.mark.e2e

STEPS, EVERY = 20, 10


def _can_hide_folders() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.fixture
def two_nodes(s3, cache_dir):
    """A head with 0 CPUs and a second node with 2 that cannot see the driver's folder and cache; stopped after."""
    base = Path(tempfile.mkdtemp(prefix="brdur-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    driver, elsewhere = base / "driver", base / "node2"
    driver.mkdir()
    elsewhere.mkdir()
    (gcs,) = free_ports(1)
    token = base / "auth_token"  # token authentication, as bioray asks (and cluster.yaml sets up)
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", f"--temp-dir={base / 'ray'}", "--disable-usage-stats"]
    logs = [open(base / "head.log", "w"), open(base / "node2.log", "w")]
    procs = [subprocess.Popen([ray_cli(), "start", "--head", "--num-cpus=0", f"--port={gcs}", "--include-dashboard=false", *common],
                              cwd=driver, env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        _wait_for_nodes(gcs, 1, procs, base, env)
        node2 = [ray_cli(), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", *common]
        hidden = _can_hide_folders()
        if hidden:
            # Its own mount namespace: the driver's folder and cache are empty tmpfs for node 2 and its workers.
            script = (f"mount -t tmpfs none {driver} && mount -t tmpfs none {cache_dir} && cd {elsewhere} && exec "
                      + " ".join(node2))
            node2 = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        procs.append(subprocess.Popen(node2, cwd=elsewhere, env=env, stdout=logs[1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait_for_nodes(gcs, 2, procs, base, env)
        yield {"address": f"127.0.0.1:{gcs}", "driver": driver, "hidden": hidden, "bucket": s3, "env": env}
    finally:
        stop_ray(procs, base, logs)


def _wait_for_nodes(gcs: int, n: int, procs, base: Path, env: dict, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, (base / "head.log").read_text()[-3000:] + (base / "node2.log").read_text()[-3000:]
        try:
            if sum(node["alive"] for node in cluster_nodes(f"127.0.0.1:{gcs}", env)) == n:
                return
        except AssertionError:
            pass  # the head is still starting
        time.sleep(2)
    raise AssertionError(f"the cluster did not reach {n} nodes in {timeout} s")


def _snapshot_names(root: str, step: int) -> bool:
    from bioray.storage import exists, read_text

    snap = f"{root}/checkpoints/checkpoint_manager_snapshot.json"
    return exists(snap) and f"step-{step:06d}" in read_text(snap)


def test_a_two_node_run_on_a_bucket_survives_a_killed_worker(two_nodes, tmp_path, cache_dir):
    import psutil

    from bioray.storage import checkpoints, exists, local_copy, read_text

    driver, bucket = two_nodes["driver"], two_nodes["bucket"]
    storage = f"{bucket}/runs"
    root = f"{storage}/durable"
    args = [sys.executable, str(ROOT / "jobs" / "finetune.py"), "--config", "quickstart"]
    # A relative run.dir: it means the driver's folder, wherever the workers run. The session's cache
    # (the tiny base, built once) is hidden from node 2 like the driver's folder.
    for kv in [f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=4",
               "eval.max_examples=8", "run.dir=runs/durable", f"data.cache_dir={cache_dir}", f"run.storage={storage}"]:
        args += ["--set", kv]
    log = tmp_path / "job.out"
    env = {**two_nodes["env"], "RAY_ADDRESS": two_nodes["address"]}
    # Where a task that asks for a CPU runs (node 2, the only node with CPUs), the driver's files are not there.
    (driver / "probe.txt").write_text("the driver's disk")
    sees = ask_cluster(env, "ray.get(ray.remote(num_cpus=1)(lambda: "
                       f"os.path.exists({str(driver / 'probe.txt')!r}) or os.listdir({str(cache_dir)!r}) != []).remote())")
    assert sees == (not two_nodes["hidden"])
    proc = subprocess.Popen(args, cwd=driver, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while not _snapshot_names(root, EVERY):
            assert proc.poll() is None, log.read_text()[-5000:]
            assert time.time() < deadline, "no checkpoint on the bucket in 15 minutes"
            time.sleep(0.5)
        workers = [p for p in psutil.process_iter(["cmdline"])
                   if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        assert workers, "no training worker to kill"
        workers[-1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    assert "resumed at step" in out  # from a checkpoint on the bucket, not from step 0

    # Everything another node or a later run reads is on the bucket; nothing points at the driver's disk.
    result = json.loads(read_text(f"{root}/result.json"))
    assert result == json.loads((driver / "runs" / "durable" / "result.json").read_text())
    assert result["train"]["steps"] == STEPS
    assert result["best_checkpoint"].startswith(root + "/checkpoints/step-")
    assert all(c["path"].startswith(root) for c in result["checkpoints"])
    for name in ("report.md", "scores.md", "metrics.jsonl", "bioray.yaml"):
        assert exists(f"{root}/{name}"), name
    assert checkpoints(root) == [f"{root}/checkpoints/step-{s:06d}" for s in range(STEPS, 0, -EVERY)]
    for kind in ("models", "corpus", "tokenised"):
        assert exists(f"{storage}/_shared/{kind}"), kind
    # The best checkpoint, read back from the bucket, loads with peft and gives the run's scores.
    with local_copy(result["best_checkpoint"]) as best:
        scores = rescore(best, driver / "runs" / "durable" / "corpus")
    for source, metrics in result["eval"].items():
        for k, v in metrics.items():
            assert scores[source][k] == pytest.approx(v, abs=1e-9), (source, k)


# ---------------------------------------------------------------- autoscaling, on one machine

def _fake_cluster_config(gcs: int) -> dict:
    """Ray's fake multi-node provider (nodes are processes here): a head with no CPU, 1-CPU workers from 0."""
    return {
        "cluster_name": "bioray-fake", "max_workers": 3, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,  # 12 s, so the test sees idle nodes go
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def test_an_autoscaling_cluster_adds_nodes_for_the_job_and_removes_them_when_idle(tmp_path, cache_dir):
    base = Path(tempfile.mkdtemp(prefix="brauto-", dir="/tmp"))
    (gcs,) = free_ports(1)
    config = base / "autoscaling.yaml"
    config.write_text(json.dumps(_fake_cluster_config(gcs)))
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(base / "head.log", "w")
    head = subprocess.Popen([ray_cli(), "start", "--head", "--block", "--num-cpus=0", f"--port={gcs}",
                             f"--autoscaling-config={config}", f"--temp-dir={base / 'ray'}", "--disable-usage-stats",
                             "--include-dashboard=false"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_nodes(gcs, 1, [head], base, env)
        address = f"127.0.0.1:{gcs}"
        assert [n["cpu"] for n in cluster_nodes(address, env)] == [0]  # nothing but the CPU-less head yet
        run_dir = tmp_path / "run"
        job = subprocess.run(
            [sys.executable, "jobs/finetune.py", "--set", f"run.dir={run_dir}", "--set", f"data.cache_dir={cache_dir}",
             "--set", "train.max_steps=10", "--set", "train.checkpoint_every=10", "--set", "eval.max_examples=8"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=1200)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-5000:]
        result = json.loads((run_dir / "result.json").read_text())
        assert result["train"]["steps"] == 10 and result["score"] is not None
        # Worker nodes were launched for the training workers and the scorer (the head has no CPU).
        added = [n for n in cluster_nodes(address, env) if n["cpu"] > 0]
        assert len(added) >= 1, added
        # And they go once idle.
        deadline = time.time() + 180
        while any(n["alive"] for n in cluster_nodes(address, env) if n["cpu"] > 0):
            assert time.time() < deadline, "idle worker nodes were not removed in 3 minutes"
            time.sleep(5)
    finally:
        stop_ray([head], base, [log])
