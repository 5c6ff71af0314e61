"""The real jobs end to end on a local Ray cluster: quickstart, evaluate, the adapter, bad input.

One quickstart run (2 CPU workers, DeepSpeed ZeRO-2, LoRA, 6 scored checkpoints) is shared by
the tests of this module; its cache folder is private to the session.
"""

import json
from pathlib import Path

import pytest
import yaml

from bioray.observe import read_metrics
from conftest import (PLANTED_SECRETS, ROOT, assert_no_secrets, mlflow_history, mlflow_runs, rescore, run_job, tracker_sets,
                      wandb_offline_runs)

pytestmark = pytest.mark.e2e

# The quickstart as shipped: its steps, reports and scored checkpoints.
TRAIN = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["train"]
STEPS, REPORTS = TRAIN["max_steps"], list(range(TRAIN["report_every"], TRAIN["max_steps"] + 1, TRAIN["report_every"]))
SCORED = list(range(TRAIN["checkpoint_every"], TRAIN["max_steps"] + 1, TRAIN["checkpoint_every"]))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    # Fake credentials in its environment, as a user's would be: test_no_secret_leaves_the_environment.
    # Each installed tracker logs the run (test_the_run_lands_in_the_trackers).
    proc = run_job("jobs/finetune.py", "--set", f"run.dir={run_dir}", "--set", f"data.cache_dir={cache_dir}",
                   *tracker_sets(run_dir.parent), env=PLANTED_SECRETS)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dir, proc


def test_no_secret_leaves_the_environment(quickstart, cache_dir):
    # Every byte the run wrote (corpus, checkpoints, bioray.yaml, result.json, metrics, TensorBoard
    # events, report.md, the trackers' MLflow store and W&B files, the cache) and printed.
    run_dir, proc = quickstart
    assert assert_no_secrets([run_dir, run_dir.parent / "mlruns", cache_dir], [proc.stdout, proc.stderr]) > 20


def test_the_run_lands_in_the_trackers(quickstart):
    """MLflow (file store) and W&B (offline) hold what metrics.jsonl and result.json hold."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    run_dir, _ = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    losses = {r["step"] - len(r["step_losses"]) + 1 + i: v for r in train for i, v in enumerate(r["step_losses"])}
    scores = {r["step"]: r["score"] for r in records if r["kind"] == "eval"}
    assert sorted(losses) == list(range(1, STEPS + 1)) and sorted(scores) == SCORED

    store = run_dir.parent / "mlruns"
    (run,) = mlflow_runs(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["run.dir"] == str(run_dir)
    assert run.data.params["corpus.sources.0.name"] == "sample_disease_ner"
    assert mlflow_history(store, run.info.run_id, "train/step_loss") == pytest.approx(losses)
    assert mlflow_history(store, run.info.run_id, "train/loss") == pytest.approx({r["step"]: r["loss"] for r in train})
    assert mlflow_history(store, run.info.run_id, "eval/score") == pytest.approx(scores)
    assert mlflow_history(store, run.info.run_id, "eval/sample_disease_ner/f1") == pytest.approx(
        {r["step"]: r["eval"]["sample_disease_ner"]["f1"] for r in records if r["kind"] == "eval"})
    assert run.data.tags["best_checkpoint"] == result["best_checkpoint"]
    assert run.data.metrics["best/score"] == pytest.approx(result["score"])

    (wb,) = wandb_offline_runs(run_dir / "wandb")
    assert wb["name"] == "run" and wb["exit_code"] == 0 and wb["config"]["train.max_steps"] == STEPS
    history = wb["history"]
    assert {h["train/step"]: h["train/step_loss"] for h in history if "train/step_loss" in h} == pytest.approx(losses)
    assert {h["train/step"]: h["train/tokens_per_s"] for h in history if "train/tokens_per_s" in h} == \
        pytest.approx({r["step"]: r["tokens_per_s"] for r in train})
    assert {h["eval/step"]: h["eval/score"] for h in history if "eval/score" in h} == pytest.approx(scores)
    assert wb["summary"]["best/checkpoint"] == result["best_checkpoint"]
    assert wb["summary"]["best/score"] == pytest.approx(result["score"])


def test_quickstart_writes_the_contracted_files(quickstart):
    run_dir, proc = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    assert set(result) >= {"train", "eval", "best_checkpoint"}
    assert set(result["train"]) >= {"first_loss", "last_loss", "steps", "tokens_per_s"}
    assert result["train"]["steps"] == STEPS
    assert result["train"]["last_loss"] < result["train"]["first_loss"]
    assert result["train"]["tokens_per_s"] > 0
    manifest = json.loads((run_dir / "corpus" / "manifest.json").read_text())
    assert {s: i["splits"]["train"]["records"] for s, i in manifest["sources"].items()} == {
        "sample_disease_ner": 480, "sample_gene_disease_re": 480, "sample_clinical_nli": 480}
    assert list((run_dir / "corpus").glob("*.parquet"))
    assert yaml.safe_load((run_dir / "bioray.yaml").read_text())["run"]["dir"] == str(run_dir)
    best = Path(result["best_checkpoint"])
    assert best.is_absolute() and best.parent == run_dir / "checkpoints"
    for name in ("adapter_model.safetensors", "adapter_config.json", "bioray.yaml", "tokenizer_config.json",
                 "tokenizer.json"):
        assert (best / name).is_file(), name
    base = json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and (Path(base) / "config.json").is_file()
    # The score table is printed for every source.
    for source in manifest["sources"]:
        assert f"| {source} |" in proc.stdout


def test_quickstart_learns_the_tasks(quickstart):
    run_dir, _ = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    ev = result["eval"]
    assert set(ev) == {"sample_disease_ner", "sample_gene_disease_re", "sample_clinical_nli"}
    ner = ev["sample_disease_ner"]
    assert ner["n"] == 64 and ner["f1"] >= 0.5 and ner["parse_rate"] >= 0.7
    assert set(ner) >= {"f1", "precision", "recall", "parse_rate", "n"}
    assert set(ev["sample_gene_disease_re"]) >= {"f1", "accuracy", "parse_rate", "n"}
    assert set(ev["sample_clinical_nli"]) >= {"accuracy", "parse_rate", "n"}
    for metrics in ev.values():
        assert all(0 <= v <= 1 for k, v in metrics.items() if k != "n")
    # RE and NLI well above chance (two and three labels).
    assert ev["sample_gene_disease_re"]["f1"] >= 0.8 and ev["sample_clinical_nli"]["accuracy"] >= 0.7


def test_the_quickstart_shows_fine_tuning_at_work(quickstart):
    # Issue 21, item 3: the base never read an answer, so the loss starts high and the first
    # checkpoint scores visibly below the best (on a base pretrained on the records the loss started
    # at 0.013 and every checkpoint scored 1.0).
    run_dir, _ = quickstart
    used = yaml.safe_load((run_dir / "bioray.yaml").read_text())
    assert used["model"]["tiny"]["pretrain_on"] in ("inputs", "twice", "prompts")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["first_loss"] > 1.0
    evals = sorted((r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"), key=lambda r: r["step"])
    assert evals[0]["score"] <= result["score"] - 0.05, [(r["step"], r["score"]) for r in evals]


def test_every_checkpoint_is_scored_and_the_best_is_kept(quickstart):
    run_dir, _ = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    kept = result["checkpoints"]
    assert len(SCORED) > 2 and len(kept) == 2  # train.keep_checkpoints of those scored
    assert all(c["score"] is not None for c in kept)
    best = max(kept, key=lambda c: (c["score"], c["step"]))
    assert result["best_checkpoint"] == best["path"] and Path(best["path"]).is_dir()
    on_disk = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert on_disk == sorted(Path(c["path"]).name for c in kept)


def test_adapter_loads_with_peft_and_reproduces_the_scores(quickstart):
    from peft import AutoPeftModelForCausalLM

    run_dir, _ = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    best = result["best_checkpoint"]
    scores = rescore(Path(best), run_dir / "corpus")
    for source, metrics in result["eval"].items():
        for k, v in metrics.items():
            assert scores[source][k] == pytest.approx(v, abs=1e-9), (source, k)
    assert AutoPeftModelForCausalLM.from_pretrained(best) is not None


@pytest.fixture(scope="module")
def evaluated(quickstart, tmp_path_factory, cache_dir):
    run_dir, _ = quickstart
    best = json.loads((run_dir / "result.json").read_text())["best_checkpoint"]
    eval_dir = tmp_path_factory.mktemp("eval") / "run"
    proc = run_job("jobs/evaluate.py", "--checkpoint", best, "--set", f"run.dir={eval_dir}",
                   "--set", f"data.cache_dir={cache_dir}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return eval_dir


def test_evaluate_checkpoint_matches_the_run(quickstart, evaluated):
    run_dir, _ = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    ev = json.loads((evaluated / "eval.json").read_text())
    assert set(ev["eval"]) == set(result["eval"])
    for source, metrics in result["eval"].items():
        assert ev["eval"][source] == pytest.approx(metrics)
    assert ev["decoding"] == "free"


def test_evaluate_predictions_scores_like_generated_text(evaluated, tmp_path):
    preds = evaluated / "predictions.jsonl"
    proc = run_job("jobs/evaluate.py", "--predictions", preds, "--set", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "run" / "eval.json").read_text())["eval"]
    first = json.loads((evaluated / "eval.json").read_text())["eval"]
    assert set(again) == set(first)
    for source, metrics in first.items():
        assert again[source] == pytest.approx(metrics)


def test_evaluate_bad_predictions_exit_2_naming_the_line(tmp_path, quickstart):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "sample_disease_ner/validation/0000000", "prediction": "x : O"}\nnot json\n')
    proc = run_job("jobs/evaluate.py", "--predictions", bad, "--set", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"bioray: error: {bad}:2: expected a JSON object per line"]


def test_evaluate_incomplete_checkpoint_exits_2(quickstart, tmp_path):
    import shutil

    run_dir, _ = quickstart
    best = Path(json.loads((run_dir / "result.json").read_text())["best_checkpoint"])
    broken = tmp_path / "broken"
    shutil.copytree(best, broken)
    (broken / "adapter_model.safetensors").unlink()
    proc = run_job("jobs/evaluate.py", "--checkpoint", broken, "--set", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "adapter_model.safetensors is missing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_evaluate_checkpoint_of_another_base_exits_2(quickstart, tmp_path):
    run_dir, _ = quickstart
    best = json.loads((run_dir / "result.json").read_text())["best_checkpoint"]
    proc = run_job("jobs/evaluate.py", "--checkpoint", best, "--set", f"run.dir={tmp_path / 'run'}",
                   "--set", "model.name_or_path=meta-llama/Llama-2-7b-hf")
    assert proc.returncode == 2
    assert "made for base model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_quickstart_writes_metrics_tensorboard_report_and_curves(quickstart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, proc = quickstart
    result = json.loads((run_dir / "result.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert len(train) + len(evals) == len(lines)
    # One line per report (every train.report_every steps), no step twice.
    assert [r["step"] for r in train] == REPORTS
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert train[-1]["loss"] == pytest.approx(result["train"]["last_loss"])
    # Scores for every scored checkpoint, the deleted one included, once each.
    assert sorted(r["step"] for r in evals) == SCORED
    for r in evals:
        assert set(r["eval"]) == set(result["eval"]) and r["checkpoint"] == f"step-{r['step']:06d}"
    best = next(r for r in evals if r["checkpoint"] == Path(result["best_checkpoint"]).name)
    assert best["eval"] == result["eval"] and best["score"] == pytest.approx(result["score"])

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/score"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == REPORTS
    assert sorted(e.step for e in acc.Scalars("eval/score")) == SCORED
    assert "eval/sample_disease_ner/f1" in tags

    report = (run_dir / "report.md").read_text()
    assert result["best_checkpoint"] in report and "**validation** split" in report
    for source in result["eval"]:
        assert f"| {source} |" in report
    assert "| adapter | LoRA rank 16, alpha 32" in report
    assert f"| steps | {STEPS} |" in report and "| decoding | free, greedy |" in report
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Progress: rank 0's step lines and the scorer's lines reach the driver's stdout.
    assert f"train step {STEPS}/{STEPS}" in proc.stdout and "examples/s" in proc.stdout


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
    """The quickstart with train.full_finetune (the paper's setting): 40 steps, two scored checkpoints."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = run_job("jobs/finetune.py", "--set", f"run.dir={run_dir}", "--set", f"data.cache_dir={cache_dir}",
                   "--set", "train.full_finetune=true", "--set", "train.max_steps=40",
                   "--set", "train.checkpoint_every=20", "--set", "train.lr=5e-5", "--set", "eval.max_examples=32")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dir


def test_full_finetune_checkpoints_are_scored(full_run):
    # Before: the scorer compared a full checkpoint's folder with its base model, every
    # validation failed and the final rescore raised after the whole run.
    result = json.loads((full_run / "result.json").read_text())
    assert result["train"]["steps"] == 40
    assert [c["step"] for c in sorted(result["checkpoints"], key=lambda c: c["step"])] == [20, 40]
    assert all(c["score"] is not None for c in result["checkpoints"])
    best = Path(result["best_checkpoint"])
    assert (best / "model.safetensors").is_file() and not (best / "adapter_config.json").exists()
    state = json.loads((best / "trainer_state.json").read_text())
    assert (Path(state["base_model"]) / "config.json").is_file()
    evals = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in evals if r["kind"] == "eval") == [20, 40]
    assert result["eval"]["sample_disease_ner"]["n"] == 32
    assert "| adapter | full fine-tune |" in (full_run / "report.md").read_text()


def test_full_finetune_checkpoint_evaluates_and_exports(full_run, tmp_path, cache_dir):
    import torch
    from safetensors.torch import load_file

    result = json.loads((full_run / "result.json").read_text())
    best = result["best_checkpoint"]
    proc = run_job("jobs/evaluate.py", "--checkpoint", best, "--set", f"run.dir={tmp_path / 'eval'}",
                   "--set", f"data.cache_dir={cache_dir}", "--set", "eval.max_examples=32")
    assert proc.returncode == 0, proc.stderr[-5000:]
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())["eval"]
    for source, metrics in result["eval"].items():
        assert ev[source] == pytest.approx(metrics), source
    proc = run_job("jobs/export.py", "--checkpoint", best, "--out", tmp_path / "merged", "--merge",
                   "--base", "tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(Path(best) / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
