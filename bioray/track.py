"""Experiment trackers: each run (each Tune trial) logged to MLflow and Weights & Biases.

A tracker gets what ``metrics.jsonl`` gets, from the same single writer (the run's ``MetricsLog``
actor, :mod:`bioray.observe`): the flattened config when the run starts, every training report
(``train/loss``, ``train/lr``, ``train/tokens_per_s`` and ``train/step_loss`` per step), every
scored checkpoint (``eval/score``, ``eval/<source>/<metric>``) and, at the end, the best checkpoint
(its URI, step and score). Both sessions are opened with Ray's own integrations
(``ray.air.integrations.mlflow.setup_mlflow``, ``ray.air.integrations.wandb.setup_wandb``) inside
that actor. Why not Tune's ``MLflowLoggerCallback``/``WandbLoggerCallback``: they see only what
reaches Tune (reports with the latest score, the sampled keys as config, Tune's iteration as the
step), never the checkpoint scores, which arrive later from validation tasks; and a plain
``TorchTrainer`` run under Train V2 takes no logger callbacks at all.

Credentials stay in the environment: the driver's ``MLFLOW_*`` and ``WANDB_*`` variables travel to
the actor with the tracker (as constructor arguments, never as a ``runtime_env``, which Ray's
runtime-env agent writes to its log), and the libraries read them there. Nothing here writes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bioray.errors import ConfigError

log = logging.getLogger("bioray")

# MLflow's limit on a parameter's value (longer ones are refused, not cut).
MAX_PARAM_LEN = 6000
_NOT_IN_KEY = re.compile(r"[^\w.\- /]")  # MLflow's key alphabet; W&B takes the same keys


def flat_config(data: dict, prefix: str = "") -> dict:
    """A config dict as ``{dotted key: value}``: mappings and lists of mappings flattened
    (``corpus.sources.0.name``, ``mixture.weights.ncbi_disease``), other lists as JSON text."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flat_config(item, f"{key}.{i}."))
        elif isinstance(v, (list, dict)):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return {_NOT_IN_KEY.sub("_", k): v for k, v in out.items()}


def _env(prefix: str) -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(prefix)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Tracker:
    """What every tracker is told; subclasses open the session in :meth:`start` (in the actor)."""

    name: str
    """The run's name there (``run.name``, or the last part of ``run.dir``)."""
    run_dir: str
    group: str | None
    """The search a Tune trial belongs to; None for a single run."""
    config: dict
    env: dict = field(default_factory=dict, repr=False)
    """The driver's tracker variables (credentials among them): set in the actor before start."""

    def start(self) -> None:
        os.environ.update(self.env)

    @staticmethod
    def train_metrics(record: dict) -> dict:
        return {f"train/{k}": float(record[k]) for k in ("loss", "lr", "tokens_per_s") if record.get(k) is not None}

    @staticmethod
    def step_losses(record: dict) -> list[tuple[int, float]]:
        """``(step, loss)`` of each optimizer step the report speaks for (its last is the report's)."""
        losses = record.get("step_losses") or []
        return [(record["step"] - len(losses) + 1 + i, float(v)) for i, v in enumerate(losses)]

    @staticmethod
    def eval_metrics(score: float | None, results: dict) -> dict:
        out = {} if score is None else {"eval/score": float(score)}
        for source, metrics in results.items():
            for metric, value in metrics.items():
                if metric != "n" and isinstance(value, (int, float)):
                    out[_NOT_IN_KEY.sub("_", f"eval/{source}/{metric}")] = float(value)
        return out


@dataclass
class MlflowTracker(Tracker):
    tracking_uri: str = ""
    experiment: str = "bioray"

    def start(self) -> None:
        super().start()
        from ray.air.integrations.mlflow import setup_mlflow

        params = {k: (v if not isinstance(v, str) or len(v) <= MAX_PARAM_LEN else v[:MAX_PARAM_LEN - 3] + "...")
                  for k, v in self.config.items()}
        tags = {"bioray.run_dir": self.run_dir, **({"bioray.search": self.group} if self.group else {})}
        # rank_zero_only=False: this is no Train worker (there is no rank to ask).
        self.mlflow = setup_mlflow(params, tracking_uri=self.tracking_uri, experiment_name=self.experiment,
                                   run_name=self.name, tags=tags, create_experiment_if_not_exists=True,
                                   rank_zero_only=False)
        self.run_id = self.mlflow.active_run().info.run_id

    def train(self, record: dict) -> None:
        from mlflow.entities import Metric

        ms = int(record.get("time", 0) * 1000)
        metrics = [Metric("train/step_loss", v, ms, s) for s, v in self.step_losses(record)]
        metrics += [Metric(k, v, ms, record["step"]) for k, v in self.train_metrics(record).items()]
        self.mlflow.MlflowClient().log_batch(self.run_id, metrics=metrics)

    def scores(self, record: dict) -> None:
        self.mlflow.log_metrics(self.eval_metrics(record["score"], record["eval"]), step=record["step"])

    def best(self, checkpoint: str, step: int | None, score: float | None) -> None:
        self.mlflow.set_tag("best_checkpoint", checkpoint)
        if score is not None:
            self.mlflow.log_metric("best/score", float(score), step=step or 0)

    def close(self, finished: bool) -> None:
        self.mlflow.end_run("FINISHED" if finished else "FAILED")


@dataclass
class WandbTracker(Tracker):
    project: str = "bioray"
    entity: str | None = None
    mode: str = "online"

    def start(self) -> None:
        super().start()
        # Ray's setup_wandb asks for an API key unless the environment says offline.
        os.environ["WANDB_MODE"] = self.mode
        import wandb
        from ray.air.integrations.wandb import setup_wandb

        self.run = setup_wandb(self.config, rank_zero_only=False, trial_name=self.name, project=self.project,
                               entity=self.entity, group=self.group, mode=self.mode,
                               dir=os.environ.get("WANDB_DIR") or self.run_dir,
                               # Ray asks to resume a run of the same id; each bioray run is a new one.
                               resume=None, settings=wandb.Settings(quiet=True))
        # Scores arrive after later training steps were logged: each kind has its own x axis, so
        # W&B's own step (which only goes up) never refuses a late score.
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("eval/*", step_metric="eval/step")

    def train(self, record: dict) -> None:
        losses = self.step_losses(record)
        for s, v in losses[:-1]:
            self.run.log({"train/step": s, "train/step_loss": v})
        last = {"train/step_loss": losses[-1][1]} if losses else {}
        self.run.log({"train/step": record["step"], **last, **self.train_metrics(record)})

    def scores(self, record: dict) -> None:
        self.run.log({"eval/step": record["step"], **self.eval_metrics(record["score"], record["eval"])})

    def best(self, checkpoint: str, step: int | None, score: float | None) -> None:
        self.run.summary.update({"best/checkpoint": checkpoint, "best/step": step, "best/score": score})

    def close(self, finished: bool) -> None:
        import wandb

        self.run.finish(exit_code=0 if finished else 1)
        # finish() returns before wandb-core has written the last records (the summary, the exit) to
        # disk, and the driver kills this actor, with its child processes, right after: seen here,
        # an offline run without its best checkpoint or exit code. teardown() waits for the service.
        wandb.teardown()


def trackers(track, config: dict, run_dir: Path, name: str, group: str | None = None) -> list[Tracker]:
    """The trackers ``track`` (the config's ``track`` section) turns on, ready to start in the metrics log.

    Args:
        track: ``cfg.track``.
        config: The run's config as a plain dict (``to_dict(cfg)``); logged flattened.
        run_dir: The run's folder.
        name: The run's name in the trackers.
        group: The search a Tune trial belongs to.
    """
    common = {"name": name, "run_dir": str(run_dir), "group": group, "config": flat_config(config)}
    out: list[Tracker] = []
    if track.mlflow.enabled:
        out.append(MlflowTracker(**common, env=_env("MLFLOW_"), tracking_uri=mlflow_uri(track.mlflow.tracking_uri),
                                 experiment=track.mlflow.experiment))
    if track.wandb.enabled:
        w = track.wandb
        out.append(WandbTracker(**common, env=_env("WANDB_"), project=w.project or os.environ.get("WANDB_PROJECT")
                                or "bioray", entity=w.entity, mode=w.mode))
    return out


def end_stopped_runs(track, search: str, trials_dir: Path) -> int:
    """Marks KILLED the MLflow runs of a search's trials that never ended; returns how many.

    A trial that ASHA stops (or a search killed midway) loses its metrics log with the trial's
    process, before it can end its runs; the search calls this once every trial is over.
    """
    if not track.mlflow.enabled:
        return 0
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri(track.mlflow.tracking_uri))
    experiment = client.get_experiment_by_name(track.mlflow.experiment)
    if experiment is None:
        return 0
    quoted = search.replace("'", "\\'")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`bioray.search` = '{quoted}' and attributes.status = 'RUNNING'")
    inside = str(Path(trials_dir).resolve()) + os.sep
    stopped = [r for r in runs if r.data.tags.get("bioray.run_dir", "").startswith(inside)]
    for run in stopped:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(stopped)


def mlflow_uri(uri: str | None) -> str:
    """The tracking URI as the driver sees it: a relative folder made absolute (the actor runs elsewhere)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        import mlflow

        return mlflow.get_tracking_uri()  # MLflow's default, already absolute
    if "://" not in uri and not uri.startswith(("file:", "databricks", "uc")):
        return Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:"):]).expanduser().resolve().as_uri()
    return uri


# ------------------------------------------------------------------------ before Ray starts


def check_trackers(track) -> None:
    """Checks each tracker the config turns on, before Ray starts: its package, and that it can log.

    MLflow: the tracking store answers (a server, a database, a folder that can be written). W&B
    online: an API key in the environment or in ``~/.netrc`` (from ``wandb login``).

    Raises:
        ConfigError: naming the key, and what to install or set.
    """
    if track.mlflow.enabled:
        _check_mlflow(track.mlflow.tracking_uri)
    if track.wandb.enabled:
        _check_wandb(track.wandb.mode)


def _check_mlflow(uri: str | None) -> None:
    try:
        import mlflow
    except ImportError:
        raise ConfigError("config key 'track.mlflow.enabled': needs the mlflow package: pip install "
                          "'bioray[mlflow]' (mlflow-skinny; the full mlflow for a sqlite:// store)") from None
    where = mlflow_uri(uri)
    # One quick try, not MLflow's minutes of retries, for a server that is not there.
    with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        try:
            mlflow.MlflowClient(where).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any store, any failure: one line naming the key
            raise ConfigError(f"config key 'track.mlflow.tracking_uri': cannot log to {where}: "
                              f"{_mlflow_reason(where, e)}") from None


def _mlflow_reason(uri: str, e: Exception) -> str:
    """Why a tracking store cannot be used, in a few words (MLflow's own first line where none fit)."""
    text = _first_line(e)
    if "MLFLOW_ALLOW_FILE_STORE" in text:
        return ("MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true is in the environment "
                "(or use a server, or sqlite:///FILE with the full mlflow package)")
    if uri.split(":", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql") and "unsupported URI" in text:
        return "a database store needs the full mlflow package (pip install mlflow), not mlflow-skinny"
    errno = re.search(r"\[Errno -?\d+\] [^\"'()]+", text)  # the OS's reason, under the HTTP client's words
    return errno.group(0).rstrip(": ") if errno else text


def _check_wandb(mode: str) -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("config key 'track.wandb.enabled': needs the wandb package: pip install "
                          "'bioray[wandb]'") from None
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not _netrc_has(_wandb_host()):
        raise ConfigError("config key 'track.wandb.mode': online needs WANDB_API_KEY in the environment (or "
                          "`wandb login`); or set track.wandb.mode=offline")


def _wandb_host() -> str:
    from urllib.parse import urlsplit

    return urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextmanager
def _environ(**values: str):
    """Sets environment variables for the block, unless the user has set them."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
