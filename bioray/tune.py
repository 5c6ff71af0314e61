"""Ray Tune search over learning rate, LoRA rank, task-mixture weights and any config key.

The driver runs the shared stages once, as a single run does (corpus, base model, tokenised
cache, scorer pool); each trial is :func:`bioray.recipes.train_and_score` with its sampled
config: a full ``TorchTrainer`` run inside a Tune function trainable (Ray 2.60's
Train-inside-Tune pattern), its checkpoints scored by the shared pool, so no trial builds a
corpus, tokenises or loads a scorer again.

The scheduler acts on the task score. Scores arrive asynchronously (a validation task per
checkpoint), so every training report carries ``latest_score``, the newest score so far
(``bioray.observe.tune_report_callback``) with ``latest_score_step``, the step it was made
at; ASHA's rungs compare trials on scores of the same step.

Outputs (``run.dir/tune/``): ``trials.csv``, ``best.yaml`` (reruns the best trial with
``jobs/finetune.py``), ``search.png``, ``result.json``; each trial's own run folder is
``run.dir/tune/trials/<trial id>/`` (result.json, report.md, checkpoints/ as in a single run).
Rerunning the same command with the same ``run.dir`` restores the experiment: finished trials
are not run again, unfinished ones resume from their latest checkpoint.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
from pathlib import Path

from bioray.checkpoint import CONFIG_FILE
from bioray.config import Config, apply_override, dump, from_dict, load, to_dict
from bioray.errors import ConfigError
from bioray.files import write_json, write_text, write_via
from bioray.recipes import Stages, pool_name, shared_stages, train_and_score
from bioray.storage import run_root

log = logging.getLogger("bioray")

FACTOR = "mixture.factor."  # a trial's per-source (or per-task) mixture factor, before normalising
EXPERIMENT = "experiment"


def mixture_names(cfg: Config, cache_meta: dict) -> list[str]:
    """What the mixture weights key on: the sources with training records, or their tasks."""
    sources = {k: v for k, v in cache_meta["sources"].items() if v["records"] > 0}
    names = {v["task"] for v in sources.values()} if cfg.mixture.by == "task" else set(sources)
    return sorted(n for n in names if cfg.mixture.weight(n) > 0)  # a dropped source stays dropped


def param_space(cfg: Config, names: list[str]) -> dict:
    """Tune's ``param_space``: dotted config keys (and mixture factors) -> search domains."""
    from ray import tune

    t = cfg.tune
    space: dict = {}
    if t.lr is not None:
        space["train.lr"] = tune.loguniform(t.lr[0], t.lr[1]) if t.lr[0] < t.lr[1] else t.lr[0]
    if t.rank is not None:
        space["lora.rank"] = tune.choice(list(t.rank))
    if t.mixture and len(names) > 1:
        for name in names:
            space[FACTOR + name] = tune.uniform(t.mixture_low, 1.0)
    for key, spec in t.space.items():
        kind, args = next(iter(spec.items()))
        space[str(key)] = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
                           "loguniform": lambda a: tune.loguniform(*a)}[kind](args)
    if not space:
        raise ConfigError("config key 'tune': nothing to search (tune.lr, tune.rank, tune.mixture and "
                          "tune.space are all off)")
    return space


def mixture_weights(params: dict) -> dict[str, float]:
    """A trial's mixture factors normalised to one point on the simplex (empty: not searched)."""
    factors = {k[len(FACTOR):]: float(v) for k, v in params.items() if k.startswith(FACTOR)}
    total = sum(factors.values())
    return {k: round(v / total, 6) for k, v in factors.items()} if total > 0 else {}


def trial_config(base: dict, params: dict, run_dir: str, trial_id: str | None = None) -> Config:
    """The config of one trial: the base config with the sampled values, in its own run folder.

    On ``run.storage`` the trial's checkpoints go under ``<search name>/trials/<trial id>``, apart
    from every other trial's and run's.
    """
    data = copy.deepcopy(base)
    weights = mixture_weights(params)
    if weights:
        data["mixture"]["weights"] = {**data["mixture"]["weights"], **weights}
    for key, value in params.items():
        if not key.startswith(FACTOR):
            apply_override(data, f"{key}={json.dumps(value)}")
    data["run"]["dir"] = run_dir
    data["run"]["name"] = f"{search_name(base)}/trials/{trial_id or Path(run_dir).name}"
    return from_dict(data)


def search_name(base: dict) -> str:
    """The search's name: its ``run.name``, or the last part of its ``run.dir`` (trials live under it)."""
    return base["run"].get("name") or Path(base["run"]["dir"]).expanduser().resolve().name


def _trial(params: dict, setup: dict) -> None:
    """One trial (runs in Tune's trial process): a whole training run with its sampled config."""
    from ray import tune

    from bioray.logs import setup_logging

    setup_logging(quiet=True)
    trial_dir = Path(setup["dir"]) / "trials" / tune.get_context().get_trial_id()
    cfg = trial_config(setup["config"], params, str(trial_dir), trial_dir.name)
    out = finished_trial(cfg, trial_dir)
    if out is None:
        write_text(trial_dir / CONFIG_FILE, dump(cfg))
        out = train_and_score(cfg, setup["stages"], setup["pool"], tune_reports=True,
                              group=search_name(setup["config"]))
    else:
        # Tune saves its experiment state every few seconds: a search stopped just after a trial
        # finished restarts that trial on resume. Its run folder says it is done; say it again.
        log.info("trial %s finished before the search stopped; reporting its result.json", trial_dir.name)
    # The trial's final word: its best checkpoint's score (what trials.csv ranks on).
    tune.report({"step": cfg.train.max_steps, "score": out["score"], "latest_score": out["score"],
                 "latest_score_step": cfg.train.max_steps, "best_checkpoint": out["best_checkpoint"]})


def finished_trial(cfg: Config, trial_dir: Path) -> dict | None:
    """The trial's ``result.json`` if it finished with this very config, else None."""
    result, saved = trial_dir / "result.json", trial_dir / CONFIG_FILE
    if not (result.is_file() and saved.is_file()) or saved.read_text() != dump(cfg):
        return None
    out = json.loads(result.read_text())
    return out if out.get("train", {}).get("steps") == cfg.train.max_steps and out.get("score") is not None else None


def max_concurrent(cfg: Config) -> int:
    """How many trials fit beside the scorer pool: CPUs (and GPUs) per trial against the cluster's."""
    import ray

    total = ray.cluster_resources()
    t = cfg.train
    pool = cfg.eval.num_actors * cfg.eval.cpus_per_actor
    per_trial = cfg.tune.trial_cpus + t.num_workers * t.cpus_per_worker
    n = int((total.get("CPU", 1.0) - pool + 1e-9) // per_trial)
    if t.use_gpu:
        n = min(n, int((total.get("GPU", 0.0) - cfg.eval.num_actors * cfg.eval.gpus_per_actor) // t.num_workers))
    return max(1, n)


def _search_alg(cfg: Config, concurrent: int):
    if cfg.tune.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # The same seed draws the same trials. This generator ignores TuneConfig's
        # max_concurrent_trials (Tune says so and runs every trial at once): it takes its own.
        return BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=concurrent)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("config key 'tune.search': optuna needs the optuna package (pip install optuna)") from None
    try:
        return OptunaSearch(metric="latest_score", mode="max", seed=cfg.run.seed)
    except (ImportError, AssertionError):
        raise ConfigError("config key 'tune.search': optuna needs the optuna package (pip install optuna)") from None


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    t = cfg.train
    grace = cfg.tune.grace_steps or max(1, 2 * (t.checkpoint_every or t.max_steps))
    # Rungs count in the step each score was made at (latest_score_step), not the step of the report
    # that carries it: a checkpoint's score arrives a few reports late, so on the training step a
    # rung compares scores one checkpoint old (docs/tuning.md). max_t above the last step: ASHA
    # stops a trial once it reaches max_t, and the trial's final report (its best score) comes at
    # max_steps.
    return ASHAScheduler(time_attr="latest_score_step", metric="latest_score", mode="max", max_t=t.max_steps + 1,
                         grace_period=min(grace, t.max_steps), reduction_factor=cfg.tune.reduction_factor)


def search(cfg: Config) -> dict:
    """Runs (or resumes) the search and writes ``run.dir/tune/``; returns ``tune/result.json``'s content."""
    import ray
    from ray import tune

    from bioray.evaluate.pool import start_pool, stop_pool

    if cfg.train.epochs is not None:
        raise ConfigError("config key 'train.epochs': a search budgets its trials in steps (ASHA's rungs), and "
                          "each trial's mixture makes its own epoch; set train.max_steps instead")
    run_dir = Path(cfg.run.dir).resolve()
    tune_dir = run_dir / "tune"
    write_text(run_dir / CONFIG_FILE, dump(cfg))
    stages: Stages = shared_stages(cfg)
    names = mixture_names(cfg, stages.cache_meta)
    space = param_space(cfg, names)
    setup = {"dir": str(tune_dir), "config": json.loads(json.dumps(to_dict(cfg))), "stages": stages,
             "pool": pool_name(cfg)}
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {"cpu": cfg.tune.trial_cpus})
    # Reports before the first score has no latest_score; ASHA skips those, Tune's strict check would not.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    concurrent = cfg.tune.max_concurrent_trials or max_concurrent(cfg)
    # Under run.storage when set, so a search resumes from any machine (a new head node, say).
    path = f"{run_root(cfg.run.dir, cfg.run.storage, cfg.run.name)}/tune/{EXPERIMENT}"
    # Ray Data's cluster-wide stats actor is created by the first dataset that runs; if that is
    # inside a trial, it lands in (and outlives) a trial's placement group, whose CPUs are then
    # never released. Run one tiny dataset here first.
    ray.data.range(1).materialize()
    actors = start_pool(cfg, stages.base_path, stages.corpus_dir, setup["pool"], stages.base_uri)
    try:
        if tune.Tuner.can_restore(path):
            log.info("resuming the search in %s (finished trials are kept)", path)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            log.info("search: %d trials, %d at a time, %s scheduler, %s search over %s", cfg.tune.num_samples,
                     concurrent, cfg.tune.scheduler, cfg.tune.search, ", ".join(space))
            tuner = tune.Tuner(
                trainable, param_space=space,
                # The random generator takes the limit itself (_search_alg); given here too, Tune
                # would warn on every search that it ignores it.
                tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples, scheduler=_scheduler(cfg),
                                            max_concurrent_trials=None if cfg.tune.search == "random" else concurrent,
                                            search_alg=_search_alg(cfg, concurrent)),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path.rsplit("/", 1)[0], verbose=0),
            )
        grid = tuner.fit()
    finally:
        stop_pool(actors)
        _end_stopped_runs(cfg, tune_dir)
    rows = trial_rows(grid, cfg, names)
    return write_outputs(cfg, rows, tune_dir)


def _end_stopped_runs(cfg: Config, tune_dir: Path) -> None:
    """Trials stopped early never end their tracker runs themselves (bioray.track.end_stopped_runs)."""
    from bioray.track import end_stopped_runs

    try:
        n = end_stopped_runs(cfg.track, search_name(to_dict(cfg)), tune_dir / "trials")
    except Exception as e:  # noqa: BLE001 - a tracker's server, never the search's result
        log.warning("tracking: could not end the runs of stopped trials: %s", str(e).strip().splitlines()[0])
        return
    if n:
        log.info("tracking: marked %d MLflow run(s) of stopped trials KILLED", n)


def trial_rows(grid, cfg: Config, names: list[str]) -> list[dict]:
    """One row per trial: its sampled values, each mixture weight, its score, steps and state."""
    rows = []
    for r in grid:
        params = r.config or {}
        history = r.metrics_dataframe
        last = r.metrics or {}
        steps = int(history["step"].max()) if history is not None and "step" in history else 0
        if last.get("score") is not None:  # the trial's own final report: its best checkpoint
            score, state = float(last["score"]), "completed"
        else:  # stopped by the scheduler (or failed): the best score it had reported
            seen = history["latest_score"].dropna() if history is not None and "latest_score" in history else []
            score = float(max(seen)) if len(seen) else None
            state = "error" if r.error is not None else "stopped early"
        row = {"trial": last.get("trial_id") or Path(r.path).name, "state": state, "score": score, "steps": steps}
        row["lr"] = params.get("train.lr", cfg.train.lr)
        row["rank"] = params.get("lora.rank", cfg.lora.rank)
        weights = mixture_weights(params)
        for name in names:
            row[f"weight.{name}"] = weights.get(name, cfg.mixture.weight(name))
        for key in cfg.tune.space:
            row[str(key)] = params.get(str(key))
        row["dir"] = str(Path(cfg.run.dir).resolve() / "tune" / "trials" / row["trial"])
        rows.append(row)
    return rows


def write_outputs(cfg: Config, rows: list[dict], tune_dir: Path) -> dict:
    """``trials.csv``, ``best.yaml``, ``search.png`` and ``result.json`` under ``run.dir/tune/``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(tune_dir / "trials.csv", buf.getvalue())
    scored = [r for r in rows if r["score"] is not None and not math.isnan(r["score"])]
    out = {"trials": len(rows), "completed": sum(r["state"] == "completed" for r in rows),
           "stopped_early": sum(r["state"] == "stopped early" for r in rows),
           "errors": sum(r["state"] == "error" for r in rows), "best": None}
    if scored:
        best = max(scored, key=lambda r: (r["state"] == "completed", r["score"]))
        # A run of its own: its own folder, and (on run.storage) its own name, not the trial's.
        best_cfg = load(Path(best["dir"]) / CONFIG_FILE, [f"run.dir={Path(cfg.run.dir) / 'best'}", "run.name=null"])
        write_text(tune_dir / "best.yaml", dump(best_cfg))
        out["best"] = {k: best[k] for k in best if k != "dir"} | {"dir": best["dir"],
                                                                  "config": str(tune_dir / "best.yaml")}
        log.info("best trial %s: score %.4f (%s); rerun it with: python jobs/finetune.py --config %s",
                 best["trial"], best["score"], best["state"], tune_dir / "best.yaml")
    write_search_plot(rows, tune_dir / "search.png", cfg)
    write_json(tune_dir / "result.json", out)
    return out


def write_search_plot(rows: list[dict], path: Path, cfg: Config) -> None:
    """``search.png``: :func:`search_figure` as a file."""
    import matplotlib.pyplot as plt

    fig = search_figure(rows, cfg)
    write_via(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def search_figure(rows: list[dict], cfg: Config):
    """Score against each searched value (one panel each), one dot per trial coloured by its state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = {"trial", "state", "score", "steps", "dir"}
    params = [k for k in (rows[0] if rows else {}) if k not in fixed
              and len({r[k] for r in rows if r.get(k) is not None}) > 1]
    colours = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}
    n = max(1, len(params))
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, params):
        for state, colour in colours.items():
            pts = [(r[key], r["score"]) for r in rows if r["state"] == state and r["score"] is not None]
            if pts:
                ax.scatter(*zip(*pts), c=colour, label=state, s=36)
        if key == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(axis_label(key, cfg))
        ax.set_ylabel("task score")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    if params:
        axes.flat[0].legend(fontsize=8)
    # The search's name, not its folder: an absolute path says where it ran, not what it was.
    name = cfg.run.name or Path(cfg.run.dir).name
    fig.suptitle(f"{name}: {len(rows)} trials (score: best checkpoint; stopped trials: latest)")
    fig.tight_layout()
    return fig


def axis_label(key: str, cfg: Config) -> str:
    """A ``trials.csv`` column as a reader reads it: ``weight of <source>`` (or ``<task>``) for a
    mixture weight (``weight.<name>``, or ``mixture.weights.<name>`` from ``tune.space``), the
    column itself otherwise (``lr``, ``rank``, a dotted config key)."""
    for prefix in ("weight.", "mixture.weights."):
        if key.startswith(prefix):
            return f"weight of {'task ' if cfg.mixture.by == 'task' else ''}{key[len(prefix):]}"
    return key
