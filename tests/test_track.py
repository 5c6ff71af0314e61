"""Experiment trackers (bioray.track): what the metrics log forwards to MLflow and W&B, read back
with MLflow's own client and from W&B's offline run file; and the checks before Ray starts.

No Ray here: the ``MetricsLog`` runs in this process, as its actor would. The same forwarding on a
real run is checked by tests/test_e2e.py (the quickstart logs to both).
"""

import json
import logging
import sys

import pytest

from bioray.config import load, to_dict
from bioray.errors import ConfigError
from bioray.observe import MetricsLog, read_metrics
from bioray.track import check_trackers, end_stopped_runs, flat_config, trackers
from conftest import mlflow_history, mlflow_runs, wandb_offline_runs

SOURCE = "ncbi_disease"


def _config(tmp_path, *sets):
    return load(None, [f"run.dir={tmp_path / 'run'}", *sets])


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """A local MLflow file store and W&B offline, with the variables the trackers set restored afterwards."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_START_METHOD", "thread")  # Ray's setup_wandb sets it; restored after
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return tmp_path / "mlruns"


def _run(cfg, log_best=True):
    """Two reports (steps 1-2 and 3-4), two scored checkpoints, the best, close: as a run sends them."""
    run_dir = cfg.run.dir
    log = MetricsLog(run_dir, trackers(cfg.track, to_dict(cfg), run_dir, "unit-run", group="search-a"))
    log.train({"step": 2, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_losses": [2.5, 2.0]})
    log.scores(2, 0.25, {SOURCE: {"f1": 0.25, "parse_rate": 0.5, "n": 8}}, "step-000002")
    log.train({"step": 4, "loss": 1.0, "lr": 5e-4, "tokens_per_s": 120.0, "step_losses": [1.5, 1.0]})
    log.scores(4, 0.75, {SOURCE: {"f1": 0.75, "parse_rate": 1.0, "n": 8}}, "step-000004")
    if log_best:
        log.best("/runs/unit/checkpoints/step-000004", 4, 0.75)
    return log.close()


def test_flat_config_flattens_sections_and_lists_of_sources():
    flat = flat_config({"train": {"lr": 0.1}, "lora": {"target_modules": ["q_proj", "v_proj"]},
                        "corpus": {"sources": [{"name": "a", "files": {"train": "x.tsv"}, "labels": {0: "no"}}]},
                        "mixture": {"weights": {}}})
    assert flat == {"train.lr": 0.1, "lora.target_modules": '["q_proj", "v_proj"]', "corpus.sources.0.name": "a",
                    "corpus.sources.0.files.train": "x.tsv", "corpus.sources.0.labels.0": "no",
                    "mixture.weights": "{}"}


def test_a_run_lands_in_mlflow_and_wandb(tmp_path, tracker_env):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    cfg = _config(tmp_path, "track.mlflow.enabled=true", f"track.mlflow.tracking_uri=file:{tracker_env}",
                  "track.wandb.enabled=true", "track.wandb.mode=offline", "train.lr=0.003")
    records = _run(cfg)
    assert [r["kind"] for r in records] == ["train", "eval", "train", "eval"]  # metrics.jsonl as without trackers

    (run,) = mlflow_runs(tracker_env)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-run"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["run.dir"] == str(tmp_path / "run")
    assert run.data.tags["best_checkpoint"] == "/runs/unit/checkpoints/step-000004"
    assert run.data.tags["bioray.search"] == "search-a"
    assert mlflow_history(tracker_env, run.info.run_id, "train/step_loss") == {1: 2.5, 2: 2.0, 3: 1.5, 4: 1.0}
    assert mlflow_history(tracker_env, run.info.run_id, "train/lr") == {2: 1e-3, 4: 5e-4}
    assert mlflow_history(tracker_env, run.info.run_id, "train/tokens_per_s") == {2: 100.0, 4: 120.0}
    assert mlflow_history(tracker_env, run.info.run_id, "eval/score") == {2: 0.25, 4: 0.75}
    assert mlflow_history(tracker_env, run.info.run_id, f"eval/{SOURCE}/f1") == {2: 0.25, 4: 0.75}
    assert mlflow_history(tracker_env, run.info.run_id, "best/score") == {4: 0.75}
    assert f"eval/{SOURCE}/n" not in run.data.metrics  # a count, not a score

    (wb,) = wandb_offline_runs(tmp_path / "run" / "wandb")  # run.dir/wandb/ without WANDB_DIR
    assert wb["name"] == "unit-run" and wb["group"] == "search-a" and wb["project"] == "bioray"
    assert wb["config"]["train.lr"] == 0.003 and wb["config"]["run.dir"] == str(tmp_path / "run")
    losses = {h["train/step"]: h["train/step_loss"] for h in wb["history"] if "train/step_loss" in h}
    assert losses == {1: 2.5, 2: 2.0, 3: 1.5, 4: 1.0}
    assert {h["train/step"]: h["train/lr"] for h in wb["history"] if "train/lr" in h} == {2: 1e-3, 4: 5e-4}
    # A late score (logged after step 4's report) still lands at its own step.
    assert {h["eval/step"]: h["eval/score"] for h in wb["history"] if "eval/score" in h} == {2: 0.25, 4: 0.75}
    assert wb["summary"]["best/checkpoint"] == "/runs/unit/checkpoints/step-000004"
    assert wb["summary"]["best/score"] == 0.75 and wb["exit_code"] == 0


def test_a_run_without_a_best_checkpoint_ends_failed(tmp_path, tracker_env):
    pytest.importorskip("mlflow")
    cfg = _config(tmp_path, "track.mlflow.enabled=true", f"track.mlflow.tracking_uri=file:{tracker_env}")
    _run(cfg, log_best=False)
    (run,) = mlflow_runs(tracker_env)
    assert run.info.status == "FAILED" and "best_checkpoint" not in run.data.tags


def test_a_tracker_that_fails_is_dropped_and_the_log_goes_on(tmp_path, tracker_env, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _config(tmp_path, "track.mlflow.enabled=true", "track.mlflow.tracking_uri=http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="bioray"):
        records = _run(cfg)
    assert len(records) == 4 and len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 4
    (warning,) = [r.getMessage() for r in caplog.records if "stopped logging" in r.getMessage()]
    assert warning.startswith("metrics: MlflowTracker stopped logging (start failed: ") and "Connection refused" in warning


def test_runs_of_trials_that_never_ended_are_marked_killed(tmp_path, tracker_env):
    mlflow = pytest.importorskip("mlflow")
    cfg = _config(tmp_path, "track.mlflow.enabled=true", f"track.mlflow.tracking_uri=file:{tracker_env}")
    client = mlflow.MlflowClient(tracker_env.as_uri())
    exp = client.create_experiment("bioray")
    trials = tmp_path / "run" / "tune" / "trials"

    def run(search, run_dir):
        return client.create_run(exp, tags={"bioray.search": search, "bioray.run_dir": str(run_dir)}).info.run_id

    done, stopped = run("s1", trials / "a"), run("s1", trials / "b")
    client.set_terminated(done, "FINISHED")
    other_search, elsewhere = run("s2", trials / "c"), run("s1", tmp_path / "other" / "trials" / "d")
    assert end_stopped_runs(cfg.track, "s1", trials) == 1
    assert {r: client.get_run(r).info.status for r in (done, stopped, other_search, elsewhere)} == {
        done: "FINISHED", stopped: "KILLED", other_search: "RUNNING", elsewhere: "RUNNING"}


def test_credentials_travel_with_the_tracker_but_never_into_its_repr(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-secret-token")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-key-0123456789")
    cfg = _config(tmp_path, "track.mlflow.enabled=true", "track.mlflow.tracking_uri=http://127.0.0.1:9",
                  "track.wandb.enabled=true")
    mlf, wb = trackers(cfg.track, to_dict(cfg), tmp_path, "r")
    assert mlf.env["MLFLOW_TRACKING_TOKEN"] == "mlflow-secret-token" and "WANDB_API_KEY" not in mlf.env
    assert wb.env["WANDB_API_KEY"] == "wandb-secret-key-0123456789"
    assert "secret" not in repr(mlf) + repr(wb)
    assert "secret" not in json.dumps(mlf.config | wb.config)


@pytest.mark.parametrize("sets, env, says", [
    (["track.mlflow.tracking_uri=http://127.0.0.1:9"], {},
     "config key 'track.mlflow.tracking_uri': cannot log to http://127.0.0.1:9: [Errno 111] Connection refused"),
    (["track.mlflow.tracking_uri=file:/sys/bioray-mlruns"], {"MLFLOW_ALLOW_FILE_STORE": "true"},
     "config key 'track.mlflow.tracking_uri': cannot log to file:/sys/bioray-mlruns: [Errno 1] Operation not "
     "permitted"),
    (["track.mlflow.tracking_uri=file:{tmp}/mlruns"], {"MLFLOW_ALLOW_FILE_STORE": None},
     "config key 'track.mlflow.tracking_uri': cannot log to file:{tmp}/mlruns: MLflow 3 refuses a file store "
     "unless MLFLOW_ALLOW_FILE_STORE=true is in the environment (or use a server, or sqlite:///FILE with the full "
     "mlflow package)"),
], ids=["unreachable", "unwritable", "file-store-refused"])
def test_an_mlflow_store_that_cannot_be_used_stops_the_job(tmp_path, monkeypatch, sets, env, says):
    pytest.importorskip("mlflow")
    for k, v in env.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    cfg = _config(tmp_path, "track.mlflow.enabled=true", *[s.replace("{tmp}", str(tmp_path)) for s in sets])
    with pytest.raises(ConfigError) as e:
        check_trackers(cfg.track)
    assert str(e.value) == says.replace("{tmp}", str(tmp_path))
    assert not (tmp_path / "mlruns").exists()


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"^config key 'track.mlflow.enabled': needs the mlflow package: pip "
                                          r"install 'bioray\[mlflow\]'"):
        check_trackers(_config(tmp_path, "track.mlflow.enabled=true").track)
    with pytest.raises(ConfigError, match=r"^config key 'track.wandb.enabled': needs the wandb package: pip "
                                          r"install 'bioray\[wandb\]'$"):
        check_trackers(_config(tmp_path, "track.wandb.enabled=true").track)


def test_wandb_online_needs_a_key_from_the_environment_or_netrc(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    track = _config(tmp_path, "track.wandb.enabled=true").track
    with pytest.raises(ConfigError, match=r"^config key 'track.wandb.mode': online needs WANDB_API_KEY"):
        check_trackers(track)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / "netrc").chmod(0o600)
    check_trackers(track)  # `wandb login` wrote it
    check_trackers(_config(tmp_path, "track.wandb.enabled=true", "track.wandb.mode=offline").track)
