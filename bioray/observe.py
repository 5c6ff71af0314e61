"""Watching a run: every report goes to ``run.dir/metrics.jsonl`` and TensorBoard, from one process.

One process writes both: a small :class:`MetricsLog` actor (no CPUs, on the driver's node, so
``run.dir`` is the driver's folder). Two senders feed it, each waiting for the write:

- Ray Train's controller, through :class:`ReportToLog` (a ``ray.train.UserCallback``): one
  ``train`` record per ``ray.train.report`` (step, loss, lr, tokens/s), rank 0's all-reduced
  numbers, once per report however many workers there are.
- The ``ValidationConfig`` task, through :class:`LoggedValidation`: one ``eval`` record per
  scored checkpoint (task score and each source's metrics), written when the scores exist, so a
  checkpoint that ``train.keep_checkpoints`` later deletes is still in the log.

Trackers (:mod:`bioray.track`, ``track.*`` in the config): the same writer forwards each record
to the MLflow and W&B runs it was started with, and the driver tells it the best checkpoint at
the end. A tracker that fails is dropped with one warning; the run and ``metrics.jsonl`` go on.

Resume: a ``train`` record whose step is not beyond the last one logged means training restarted
from a checkpoint (a worker-group restart, or a new driver on the same ``run.dir``); records at
that step and after are dropped from ``metrics.jsonl`` (rewritten atomically) and purged from
TensorBoard (``SummaryWriter(purge_step=...)``), so every step appears once. An ``eval`` record
for a step already scored is ignored (Ray re-runs a validation only when it did not finish).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from bioray._ray import UserCallback
from bioray.files import write_text

log = logging.getLogger("bioray")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
NAMESPACE = "bioray"
# What a `train` record keeps of the worker's report (the rest is for result.json).
TRAIN_KEYS = ("loss", "lr", "tokens_per_s")


class MetricsLog:
    """Owns ``run.dir/metrics.jsonl`` and ``run.dir/tensorboard/``: the one writer of both."""

    def __init__(self, run_dir: str, trackers: Sequence = ()):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        self.records = read_metrics(self.path)
        self._tb = None
        self.trackers = list(trackers)
        self._forward("start")
        self._finished = False

    def train(self, metrics: dict) -> None:
        """Logs one training report (``step``, ``loss``, ``lr``, ``tokens_per_s``)."""
        step = int(metrics["step"])
        record = {"kind": "train", "step": step, **{k: metrics[k] for k in TRAIN_KEYS if k in metrics},
                  "time": round(time.time(), 3)}
        if metrics.get("step_losses"):
            # The mean loss of every step since the last report (the last one is `step`'s).
            record["step_losses"] = [float(v) for v in metrics["step_losses"]]
        last = max((r["step"] for r in self.records if r["kind"] == "train"), default=0)
        purge = step <= last
        if purge:
            # Training restarted from a checkpoint: what was logged from here on is superseded.
            self.records = [r for r in self.records if r["step"] < step]
            _rewrite(self.path, self.records)
            log.info("metrics: resumed at step %d, dropped the records logged from it on", step)
        self._append(record)
        # The first step this record speaks for: TensorBoard hides what was logged from there on.
        first = step - len(record.get("step_losses", [None])) + 1
        tb = self._writer(purge_step=first if purge else None)
        for k in TRAIN_KEYS:
            if k in record:
                tb.add_scalar(f"train/{k}", record[k], step)
        losses = record.get("step_losses", [])
        for i, v in enumerate(losses):
            tb.add_scalar("train/step_loss", v, step - len(losses) + 1 + i)
        tb.flush()
        self._forward("train", record)

    def scores(self, step: int, score: float | None, results: dict, checkpoint: str | None = None) -> None:
        """Logs one scored checkpoint: its task score and ``{source: {metric: value}}``."""
        step = int(step)
        if any(r["kind"] == "eval" and r["step"] == step for r in self.records):
            log.info("metrics: step %d is already scored in %s; keeping the first", step, self.path)
            return
        record = {"kind": "eval", "step": step, "score": score, "eval": results, "checkpoint": checkpoint,
                  "time": round(time.time(), 3)}
        self._append(record)
        tb = self._writer()
        if score is not None:
            tb.add_scalar("eval/score", score, step)
        for source, metrics in results.items():
            for metric, value in metrics.items():
                if metric != "n" and isinstance(value, (int, float)):
                    tb.add_scalar(f"eval/{source}/{metric}", value, step)
        tb.flush()
        self._forward("scores", record)

    def best(self, checkpoint: str, step: int | None, score: float | None) -> None:
        """Tells the trackers the run's best checkpoint (its URI); the run then counts as finished."""
        self._forward("best", checkpoint, step, score)
        self._finished = True

    def latest_score(self) -> dict | None:
        """The newest scored checkpoint so far: ``{"step", "score"}``, or None before any."""
        scored = [r for r in self.records if r["kind"] == "eval" and r.get("score") is not None]
        if not scored:
            return None
        last = max(scored, key=lambda r: r["step"])
        return {"step": last["step"], "score": last["score"]}

    def close(self) -> list[dict]:
        """Flushes TensorBoard, ends the trackers' runs (failed, unless :meth:`best` was told) and
        returns every record (train and eval, in the order logged)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._forward("close", self._finished)
        self.trackers = []
        return list(self.records)

    def _forward(self, method: str, *args) -> None:
        """Calls ``method`` on each tracker; one that fails is dropped (metrics are a view of the run)."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker's server or package, never the run
                self.trackers.remove(tracker)
                log.warning("metrics: %s stopped logging (%s failed: %s)", type(tracker).__name__, method,
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    def _append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)

    def _writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        if purge_step is not None and self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._tb is None:
            # purge_step: TensorBoard hides every earlier event at this step or later, the
            # same records metrics.jsonl just dropped.
            self._tb = SummaryWriter(str(self.dir / TENSORBOARD_DIR), purge_step=purge_step,
                                     flush_secs=10)
        return self._tb


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an empty list if there is none; a torn last line is skipped)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash mid-write
    return out


def _rewrite(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------------- on Ray


def start_metrics_log(run_dir: Path, trackers: Sequence = ()):
    """Starts the run's :class:`MetricsLog` actor on this (the driver's) node; returns its handle.

    ``trackers`` (:func:`bioray.track.trackers`) start in the actor and get every record.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = "metrics-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    node = ray.get_runtime_context().get_node_id()
    return ray.remote(MetricsLog).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0,
        # run.dir is a folder on the driver's machine: the writer must run there.
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(str(Path(run_dir).resolve()), trackers)


def log_best(handle, checkpoint: str, step: int | None, score: float | None) -> None:
    """Tells the run's metrics log (and so its trackers) the best checkpoint, before it closes."""
    _send(handle.best.remote(checkpoint, step, score), "the best checkpoint")


def stop_metrics_log(handle, run_dir: Path) -> list[dict]:
    """Closes the writer (after every sender has finished) and returns all records.

    If the actor is gone (it never is in a healthy run), the records are read back from the file.
    """
    import ray

    try:
        records = ray.get(handle.close.remote(), timeout=120)
    except Exception as e:  # noqa: BLE001 - never hide the error a failed run is raising
        log.warning("metrics: the metrics log did not close cleanly (%s); reading %s", type(e).__name__,
                    Path(run_dir) / METRICS_FILE)
        records = read_metrics(Path(run_dir) / METRICS_FILE)
    ray.kill(handle)
    return records


def _send(call, what: str) -> None:
    """Waits for one write; a failed write costs a line in the log, never the run."""
    import ray

    try:
        ray.get(call, timeout=60)
    except Exception as e:  # noqa: BLE001 - metrics are a view of the run, not the run
        log.warning("metrics: could not log %s: %s", what, str(e).splitlines()[0] if str(e) else type(e).__name__)


class ReportToLog(UserCallback):
    """Ray Train callback (runs in the Train controller): every report -> ``MetricsLog.train``."""

    def __init__(self, metrics_log):
        self.metrics_log = metrics_log

    def after_report(self, run_context, metrics, checkpoint):
        # metrics[i] is worker i's dict; the loop all-reduces before reporting, so rank 0's is the run's.
        if metrics and "step" in metrics[0]:
            _send(self.metrics_log.train.remote(metrics[0]), f"step {metrics[0]['step']}")


def tune_report_callback(metrics_log):
    """A Ray Train callback that forwards each report to Ray Tune with the latest task score.

    Checkpoint scores arrive asynchronously, after the report that made the checkpoint, and never
    reach Tune by themselves (FACTS.md); so every report carries ``latest_score`` (and
    ``latest_score_step``), the newest score the metrics log has, for the scheduler to act on.
    Built on demand: ``TuneReportCallback`` only exists inside a Tune session.
    """
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                try:
                    latest = ray.get(metrics_log.latest_score.remote(), timeout=30)
                except Exception:  # noqa: BLE001 - a late score only delays the scheduler
                    latest = None
                if latest is not None:
                    metrics = [{**metrics[0], "latest_score": latest["score"],
                                "latest_score_step": latest["step"]}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return TuneReport()


class LoggedValidation:
    """A ``ValidationConfig`` fn: scores a checkpoint with ``fn``, then logs the scores once.

    ``step`` comes from the report's own ``ValidationTaskConfig(fn_kwargs={"step": ...})``.
    """

    def __init__(self, fn, metrics_log=None):
        self.fn, self.metrics_log = fn, metrics_log

    def __call__(self, checkpoint, step: int | None = None, **kwargs) -> dict:
        out = self.fn(checkpoint, **kwargs)
        name = Path(getattr(checkpoint, "path", str(checkpoint))).name
        if out.get("score") is not None:
            log.info("scored %s: task score %.4f", name, out["score"])
        if self.metrics_log is not None and step is not None:
            _send(self.metrics_log.scores.remote(step, out.get("score"), out.get("eval", {}), name),
                  f"scores of step {step}")
        return out
