"""jobs/tune.py end to end on the tiny quickstart: 3 trials, 2 at a time, ASHA on the task score,
a search killed midway and resumed without rerunning finished trials, best.yaml rerun by finetune.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bioray.config import load
from conftest import PLANTED_SECRETS, ROOT, assert_no_secrets, mlflow_runs, run_job, tracker_sets, wandb_offline_runs

pytestmark = pytest.mark.e2e

# Learning rates far apart: 1e-6 learns nothing in 64 steps (no answer parses: score 0), 0.003-0.005
# learn RE and NLI (the quickstart's base never read an answer, so at 32 steps of 4 rows no trial had
# learnt anything yet, and a wrecking rate of 2.0 scored 0.125 on chance answers). With run.seed 0
# the search draws the second, the third, the second: the third trial meets ASHA's rung (step 48)
# after a good and a bad one have set it. A checkpoint's score reaches Tune only with a later
# training report, and at 24 steps no trial's report carried one in a fresh-clone CI run.
LRS = (0.003, 1e-6, 0.005)
BAD = 1e-6
SEARCH = ["train.max_steps=64", "train.checkpoint_every=16", "train.report_every=8", "train.num_workers=1",
          "train.micro_batch_size=8", "eval.max_examples=16", "tune.num_samples=3", "tune.max_concurrent_trials=2",
          "tune.lr=null", "tune.grace_steps=48", "tune.space={train.lr: {choice: [0.003, 1.0e-6, 0.005]}}"]


def _args(run_dir, cache_dir):
    sets = [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *SEARCH]
    # Each installed tracker logs every trial (test_each_trial_is_a_tracker_run).
    return ["jobs/tune.py", *[a for s in sets for a in ("--set", s)], *tracker_sets(run_dir.parent)]


def _trials(run_dir: Path) -> list[dict]:
    with open(run_dir / "tune" / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def search(tmp_path_factory, cache_dir):
    """A search killed once a trial has finished, then run again to the end (and once more)."""
    run_dir = tmp_path_factory.mktemp("tune") / "run"
    # Fake credentials in both runs' environment (test_no_secret_leaves_the_environment reads what they
    # wrote and printed); the killed run's output goes to files beside the run folder.
    out = run_dir.parent / "first.out"
    with open(out, "w") as log:
        first = subprocess.Popen([sys.executable, *map(str, _args(run_dir, cache_dir))], cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **PLANTED_SECRETS})
    finished: dict[Path, float] = {}
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        finished = {p: p.stat().st_mtime for p in (run_dir / "tune" / "trials").glob("*/result.json")}
        if finished:
            break
        time.sleep(2)
    assert finished, "no trial finished before the search was stopped"
    os.killpg(first.pid, signal.SIGKILL)  # a crash: nothing gets to clean up
    first.wait(timeout=60)
    # Trials cut off mid-way that had made a checkpoint: if they train again, they go on from it.
    cut = {p.parents[2]: (p.parents[2] / "metrics.jsonl").stat().st_mtime
           for p in (run_dir / "tune" / "trials").glob("*/checkpoints/step-*/trainer_state.json")
           if not (p.parents[2] / "result.json").exists()}
    resumed = run_job(*_args(run_dir, cache_dir), timeout=1200, env=PLANTED_SECRETS)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    return run_dir, finished, resumed, cut


def test_no_secret_leaves_the_environment(search, cache_dir):
    run_dir, _, resumed, _ = search
    first = (run_dir.parent / "first.out").read_text(errors="replace")
    assert assert_no_secrets([run_dir, cache_dir], [first, resumed.stdout, resumed.stderr]) > 20


def test_each_trial_is_a_tracker_run(search):
    """Every trial is an MLflow run and a W&B run of the search's group; none is left running."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    run_dir, _, _, _ = search
    trials = run_dir / "tune" / "trials"
    # The search's runs (best.yaml's rerun, a single run, may be there too).
    runs = [r for r in mlflow_runs(run_dir.parent / "mlruns") if "bioray.search" in r.data.tags]
    assert {r.data.tags["bioray.search"] for r in runs} == {"run"}
    # The first search was killed midway; the resumed one ended what it left (and what ASHA stopped).
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(Path(r.data.tags["bioray.run_dir"]).name, []).append(r)
    rows = _trials(run_dir)
    assert set(by_trial) == {r["trial"] for r in rows}
    for row in rows:
        assert {float(r.data.params["train.lr"]) for r in by_trial[row["trial"]]} == {float(row["lr"])}
        if row["state"] == "completed":
            result = json.loads((trials / row["trial"] / "result.json").read_text())
            (done,) = [r for r in by_trial[row["trial"]] if r.info.status == "FINISHED"]
            assert done.data.tags["best_checkpoint"] == result["best_checkpoint"]
            assert done.info.run_name == f"run/trials/{row['trial']}"
            wb = [w for w in wandb_offline_runs(trials / row["trial"] / "wandb") if w["exit_code"] == 0]
            assert len(wb) == 1 and wb[0]["group"] == "run"
            assert wb[0]["summary"]["best/checkpoint"] == result["best_checkpoint"]


def test_every_trial_ends_with_its_sample_and_a_point_on_the_simplex(search):
    run_dir, _, resumed, _ = search
    rows = _trials(run_dir)
    assert len(rows) == 3 and len({r["trial"] for r in rows}) == 3
    for r in rows:
        assert r["state"] in ("completed", "stopped early"), r
        assert float(r["lr"]) in LRS
        weights = [float(v) for k, v in r.items() if k.startswith("weight.")]
        assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-4 and min(weights) > 0
        assert int(r["steps"]) <= 64
    out = json.loads((run_dir / "tune" / "result.json").read_text())
    assert out["trials"] == 3 and out["errors"] == 0
    assert "trials: 3" in resumed.stdout and (run_dir / "tune" / "search.png").stat().st_size > 10_000


def test_the_scheduler_sees_task_scores_during_training(search):
    run_dir, _, _, _ = search
    # Tune's own per-trial results: the training reports forwarded with the newest checkpoint score.
    seen = []
    for result in (run_dir / "tune" / "experiment").glob("*/result.json"):
        for line in result.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("latest_score") is not None and "score" not in rec:
                seen.append((rec["latest_score_step"], rec["step"]))
    assert seen and all(scored <= step for scored, step in seen)
    rows = _trials(run_dir)
    good = [float(r["score"]) for r in rows if float(r["lr"]) > BAD and r["score"]]
    bad = [float(r["score"]) for r in rows if float(r["lr"]) == BAD and r["score"]]
    if good and bad:
        assert max(good) > max(bad)  # the task score tells the two learning rates apart
    for r in rows:
        if r["state"] == "stopped early":  # ASHA stopped it on a score it had reported
            assert r["score"] != ""


def test_a_killed_search_resumes_without_rerunning_finished_trials(search, cache_dir):
    run_dir, finished, resumed, cut = search
    assert "resuming the search" in resumed.stdout + resumed.stderr
    # A trial killed after a checkpoint that trained again (ASHA may have stopped it before the
    # kill) continued from its checkpoint, not from step 0.
    went_on = [d.name for d, mtime in cut.items() if (d / "metrics.jsonl").stat().st_mtime != mtime]
    if went_on:
        assert "resumed at step" in resumed.stdout, went_on
    for path, mtime in finished.items():
        assert path.stat().st_mtime == mtime, f"{path.parent.name} ran again"
    again = run_job(*_args(run_dir, cache_dir), timeout=600)
    assert again.returncode == 0, again.stderr[-5000:]
    assert len(_trials(run_dir)) == 3


def test_best_yaml_reruns_the_best_trial(search, cache_dir):
    run_dir, _, _, _ = search
    out = json.loads((run_dir / "tune" / "result.json").read_text())
    best = out["best"]
    cfg = load(run_dir / "tune" / "best.yaml")
    assert cfg.run.dir == str(run_dir / "best")
    assert cfg.train.lr == pytest.approx(float(best["lr"])) and cfg.lora.rank == int(best["rank"])
    trial_cfg = yaml.safe_load((Path(best["dir"]) / "bioray.yaml").read_text())
    assert cfg.mixture.weights == trial_cfg["mixture"]["weights"]
    proc = run_job("jobs/finetune.py", "--config", run_dir / "tune" / "best.yaml", "--set",
                   f"data.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    rerun = json.loads((run_dir / "best" / "result.json").read_text())
    assert rerun["score"] == pytest.approx(best["score"], abs=0.05)
