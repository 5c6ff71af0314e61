"""A run survives what a cloud cluster does to it: a killed worker, a killed driver, a changed config.

Three short runs of the quickstart (30 steps, a checkpoint every 10) with one seed: one left
alone, one whose training worker is SIGKILLed after the step-10 checkpoint (Ray Train restarts
the worker group, ``train.max_failures``), one whose whole driver, Ray cluster included, is
SIGKILLed and then started again with the same command. The interrupted runs must end exactly
where the undisturbed one did: same step count, same final adapter, same loss at every step.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_job

pytestmark = pytest.mark.e2e

STEPS, EVERY = 30, 10
SETTINGS = [f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.report_every=5",
            "train.keep_checkpoints=4", "eval.max_examples=8"]


def _args(run_dir, cache_dir, *extra):
    out = []
    for kv in [*SETTINGS, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *extra]:
        out += ["--set", kv]
    return out


def _start(run_dir, cache_dir, log):
    """The job in its own session, so the driver and its local Ray die together when asked.

    Its output goes to a file, not a pipe: nobody reads a pipe while the test waits, and a full one
    would stall the job.
    """
    return subprocess.Popen([sys.executable, "jobs/finetune.py", *_args(run_dir, cache_dir)], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ})


def _wait_for_checkpoint(proc, run_dir, step, timeout=600):
    """Waits until Ray Train has registered the checkpoint of ``step`` (its snapshot names it)."""
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the job ended before its checkpoint (exit {proc.returncode})"
        if snapshot.is_file() and f"step-{step:06d}" in snapshot.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of step {step} within {timeout}s")


def _train_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["kind"] == "train"}


def _adapter(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors"))


def _assert_same_run(run_dir, reference):
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["steps"] == STEPS
    # No checkpoint lost or half-written: all three, each complete with its resume state.
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert names == [f"step-{s:06d}" for s in range(EVERY, STEPS + 1, EVERY)]
    for name in names:
        ckpt = run_dir / "checkpoints" / name
        assert (ckpt / "resume" / "deepspeed").is_dir() and len(list((ckpt / "resume").glob("rng-rank*"))) == 2
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == int(name[5:])
    # The final adapter equals the undisturbed run's.
    a, b = _adapter(run_dir, STEPS), _adapter(reference, STEPS)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    # And so does the loss of every step (each report carries the steps since the last one).
    mine, theirs = _train_records(run_dir), _train_records(reference)
    assert sorted(mine) == sorted(theirs) == list(range(5, STEPS + 1, 5))
    for step in mine:
        assert mine[step]["step_losses"] == pytest.approx(theirs[step]["step_losses"], abs=1e-5), step


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    proc = run_job("jobs/finetune.py", *_args(run_dir, cache_dir))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dir


def test_a_killed_worker_then_a_killed_driver_and_the_run_ends_exactly_as_undisturbed(undisturbed, tmp_path, cache_dir):
    # One run takes both blows, as a preemptible cluster may deal them: a training worker SIGKILLed
    # after step 10's checkpoint (Ray Train replaces the worker group and resumes by itself), then
    # after step 20's the whole driver with its Ray cluster; the same command run again.
    import psutil

    run_dir, log = tmp_path / "run", tmp_path / "first.out"
    proc = _start(run_dir, cache_dir, log)
    _wait_for_checkpoint(proc, run_dir, EVERY)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no training worker to kill"
    workers[-1].send_signal(signal.SIGKILL)
    _wait_for_checkpoint(proc, run_dir, 2 * EVERY)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started, at once
    proc.wait(timeout=60)
    # The worker group restarted from a checkpoint, not from step 0.
    assert "resumed at step" in log.read_text(errors="replace")
    again = run_job("jobs/finetune.py", *_args(run_dir, cache_dir))
    assert again.returncode == 0, again.stderr[-5000:]
    assert "resuming from" in again.stdout
    _assert_same_run(run_dir, undisturbed)


def test_a_rerun_with_other_training_keys_exits_2_and_fresh_starts_over(undisturbed, tmp_path, cache_dir):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(undisturbed, run_dir)
    proc = run_job("jobs/finetune.py", *_args(run_dir, cache_dir, "train.lr=3e-4"))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "config key 'train.lr'" in line and "--fresh" in line
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert before == sorted(p.name for p in (undisturbed / "checkpoints").iterdir())  # nothing touched
    # A key that does not change what is trained (how much is scored) resumes: nothing left to train.
    proc = run_job("jobs/finetune.py", *_args(run_dir, cache_dir, "eval.max_examples=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["train"]["steps"] == STEPS


def test_a_corrupted_checkpoint_is_refused_and_resume_falls_back(undisturbed, tmp_path, cache_dir):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(undisturbed, run_dir)
    latest = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    weights = latest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # cut short, as an interrupted copy leaves it
    for job, extra in (("jobs/export.py", ["--checkpoint", latest, "--out", tmp_path / "out"]),
                       ("jobs/evaluate.py", ["--checkpoint", latest, "--set", f"run.dir={tmp_path / 'eval'}"])):
        proc = run_job(job, *extra)
        assert proc.returncode == 2, (job, proc.stderr[-3000:])
        (line,) = proc.stderr.strip().splitlines()
        assert f"{weights}: checksum mismatch" in line
    assert not (tmp_path / "out").exists()
    # Resuming the run from it falls back to step 20, trains the last 10 steps again, and ends where
    # the undisturbed run did.
    proc = run_job("jobs/finetune.py", *_args(run_dir, cache_dir))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "the newest checkpoint that verifies" in proc.stdout
    a, b = _adapter(run_dir, STEPS), _adapter(undisturbed, STEPS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
