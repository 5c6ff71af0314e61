"""The run's metrics log (metrics.jsonl + TensorBoard), report.md and curves.png, without Ray."""

import json

import pytest

from bioray.config import Config, from_dict, to_dict
from bioray.observe import METRICS_FILE, TENSORBOARD_DIR, LoggedValidation, MetricsLog, read_metrics
from bioray.report import run_report, write_curves

SCORES = {"ner_a": {"f1": 0.5, "precision": 0.5, "recall": 0.5, "parse_rate": 0.9, "n": 8},
          "nli_b": {"accuracy": 0.75, "parse_rate": 1.0, "n": 8}}


def _cfg(tmp_path) -> Config:
    d = to_dict(Config())
    d["run"]["dir"] = str(tmp_path)
    d["corpus"]["sources"] = [
        {"name": "ner_a", "format": "iob", "task": "ner", "entity": "disease", "files": {"train": "x"},
         "reference": {"metric": "f1", "llama2_medtuned_7b": 87.18, "encoder": {"name": "BioBERT", "score": 88.62}}},
        {"name": "nli_b", "format": "nli", "task": "nli", "files": {"train": "y"}},
    ]
    d["mixture"]["weights"] = {"ner_a": 2.0}
    return from_dict(d)


def _train(step, loss):
    # What the worker reports: more keys than the log keeps.
    return {"step": step, "loss": loss, "first_loss": 3.0, "lr": 1e-3 / step, "tokens_per_s": 100.0 + step,
            "run_tokens_per_s": 99.0}


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_report_and_score_lands_once_in_jsonl_and_tensorboard(tmp_path):
    m = MetricsLog(str(tmp_path))
    for step, loss in ((10, 3.0), (20, 2.0)):
        m.train(_train(step, loss))
    m.scores(20, 0.625, SCORES, "step-000020")
    m.scores(20, 0.1, SCORES, "step-000020")  # a re-run validation: the first one stays
    m.train(_train(30, 1.5))
    records = m.close()

    lines = read_metrics(tmp_path / METRICS_FILE)
    assert lines == records
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 10), ("train", 20), ("eval", 20), ("train", 30)]
    assert set(lines[0]) == {"kind", "step", "loss", "lr", "tokens_per_s", "time"}
    assert lines[2]["score"] == 0.625 and lines[2]["eval"] == SCORES and lines[2]["checkpoint"] == "step-000020"

    tb = _scalars(tmp_path / TENSORBOARD_DIR)
    assert tb["train/loss"] == [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert [s for s, _ in tb["train/lr"]] == [10, 20, 30]
    assert [s for s, _ in tb["train/tokens_per_s"]] == [10, 20, 30]
    assert tb["eval/score"] == [(20, 0.625)]
    assert tb["eval/ner_a/f1"] == [(20, 0.5)] and tb["eval/nli_b/accuracy"] == [(20, 0.75)]
    assert "eval/ner_a/n" not in tb


@pytest.mark.parametrize("new_process", [False, True], ids=["same-log", "new-driver"])
def test_resume_drops_what_the_restart_supersedes(tmp_path, new_process):
    m = MetricsLog(str(tmp_path))
    for step in (10, 20, 30, 40):
        m.train(_train(step, 5.0 - step / 10))
    m.scores(20, 0.5, SCORES, "step-000020")
    if new_process:  # the driver died; a new one resumes on the same run.dir
        m.close()
        m = MetricsLog(str(tmp_path))
    # Resumed from the checkpoint at step 20: the next report is step 30 again.
    m.train(_train(30, 1.0))
    m.train(_train(40, 0.5))
    m.scores(40, 0.9, SCORES, "step-000040")
    m.close()

    lines = read_metrics(tmp_path / METRICS_FILE)
    train = [r["step"] for r in lines if r["kind"] == "train"]
    assert train == [10, 20, 30, 40]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [20, 40]
    assert [r["loss"] for r in lines if r["kind"] == "train"] == [4.0, 3.0, 1.0, 0.5]
    tb = _scalars(tmp_path / TENSORBOARD_DIR)
    assert tb["train/loss"] == [(10, 4.0), (20, 3.0), (30, 1.0), (40, 0.5)]
    assert tb["eval/score"] == [(20, 0.5), (40, pytest.approx(0.9))]


def test_a_torn_last_line_is_skipped(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"kind": "train", "step": 10, "loss": 1.0}) + '\n{"kind": "tr')
    assert read_metrics(tmp_path / METRICS_FILE) == [{"kind": "train", "step": 10, "loss": 1.0}]


def test_logged_validation_passes_through_and_strips_the_step():
    calls = []

    def fn(checkpoint, pool):
        calls.append((checkpoint, pool))
        return {"score": 0.5, "eval": SCORES}

    assert LoggedValidation(fn)("ckpt", step=40, pool="p") == {"score": 0.5, "eval": SCORES}
    assert calls == [("ckpt", "p")]


def _result(tmp_path):
    ck = tmp_path / "checkpoints"
    return {
        "train": {"first_loss": 3.0, "last_loss": 0.5, "steps": 40, "tokens_per_s": 1234.5, "seconds": 60.0},
        "eval": SCORES, "score": 0.625, "best_checkpoint": str(ck / "step-000040"),
        "checkpoints": [{"path": str(ck / "step-000040"), "step": 40, "score": 0.625},
                        {"path": str(ck / "step-000030"), "step": 30, "score": 0.5}],
        "mixture": {"ner_a": 320, "nli_b": 160}, "decoding": "free", "split": "validation",
    }


def _records():
    out = [{"kind": "train", "step": s, "loss": 30.0 / s, "lr": 1e-3, "tokens_per_s": 100.0}
           for s in (10, 20, 30, 40)]
    out += [{"kind": "eval", "step": s, "score": sc, "eval": SCORES, "checkpoint": f"step-{s:06d}"}
            for s, sc in ((20, 0.25), (30, 0.5), (40, 0.625))]
    return out


def test_report_has_scores_references_best_checkpoint_and_settings(tmp_path):
    cfg = _cfg(tmp_path)
    text = run_report(cfg, _result(tmp_path), _records())
    assert f"Best checkpoint: `{tmp_path / 'checkpoints' / 'step-000040'}` (step 40, task score 62.50" in text
    assert "| source | task | metric | bioray (validation) |" in text
    # bioray beside the paper's and the encoder's numbers, on the same row.
    assert "| ner_a | ner | f1 | 50.00 | 90.00 | 8 | 87.18 | 88.62 (BioBERT) |" in text
    assert "| nli_b | nli | accuracy | 75.00 | 100.00 | 8 |" in text
    assert "**validation** split" in text and "![loss and task score against step](curves.png)" in text
    # Every scored checkpoint, including one keep_checkpoints deleted.
    assert "| 20 | `step-000020` | 25.00 | 50.00 | 75.00 | deleted |" in text
    assert "| 30 | `step-000030` | 50.00 | 50.00 | 75.00 | yes |" in text
    assert "| 40 | `step-000040` | 62.50 | 50.00 | 75.00 | best |" in text
    for row in ("| model | `tiny` (Llama", "| steps | 200 |", "| learning rate | 0.0002, 10 warmup steps",
                "| adapter | LoRA rank 16, alpha 32",
                "| mixture | ner_a 2 (320 records/epoch), nli_b 1 (160 records/epoch)",
                "| decoding | free, greedy |"):
        assert row in text, row
    assert "40 steps, loss 3.0000 -> 0.5000" in text


def test_report_shows_task_weights_under_mixture_by_task(tmp_path):
    # Before: report.md looked weights up by source name, so every source showed 1 under by: task.
    d = to_dict(_cfg(tmp_path))
    d["mixture"] = {**d["mixture"], "by": "task", "weights": {"ner": 3.0, "nli": 0.5}}
    text = run_report(from_dict(d), _result(tmp_path), _records())
    assert "| mixture | ner_a 3 (320 records/epoch), nli_b 0.5 (160 records/epoch) (by task)" in text


def test_curves_png_is_a_png(tmp_path):
    path = tmp_path / "curves.png"
    write_curves(_records(), path, title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # No scores yet (a run that scored nothing) still draws the loss.
    write_curves(_records()[:4], tmp_path / "loss-only.png")
    assert (tmp_path / "loss-only.png").read_bytes()[:4] == b"\x89PNG"


def test_ray_data_progress_block_becomes_one_line():
    import logging

    from bioray.logs import OneLineProgress

    block = ["======= Running Dataset: dataset_7_0 =======", "Total Progress: 480/1440",
             "Active & requested resources: 1/2 CPU, 683.4KiB/3.1GiB object store", "", "=" * 43,
             "Progress will be logged because stdout is a non-interactive terminal."]
    f = OneLineProgress()
    kept = []
    for msg in block:
        record = logging.LogRecord("ray.data", logging.INFO, __file__, 1, msg, (), None)
        if f.filter(record):
            kept.append(record.getMessage())
    assert kept == ["dataset_7_0: 480/1440 rows", block[-1]]
