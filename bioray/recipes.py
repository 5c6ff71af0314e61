"""The recipes: the stages wired together for the jobs (prepare, finetune, evaluate) and for a search.

``jobs/*.py`` parse arguments and call these. :func:`shared_stages` runs what one run and a whole
Tune search share (corpus, base model, tokenised cache); :func:`train_and_score` is one training
run on them, scored by a scorer pool: ``finetune`` calls it once, each Tune trial once with its
own config (``bioray.tune``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bioray.checkpoint import (CONFIG_FILE, STATE_FILE, check_base, check_base_exists, check_made_by, check_revision,
                               first_difference, verify)
from bioray.config import Config, dump, from_dict, to_dict
from bioray.corpus.sources import quote
from bioray.errors import CheckpointError, ConfigError, DataError
from bioray.files import write_json, write_text, write_via
from bioray.optim import optimizer_class
from bioray.storage import (full_uri, is_uri, latest_checkpoint, local_copy, move_aside, publish_folder, read_text,
                            run_root, shared_filesystem, upload)

log = logging.getLogger("bioray")


@dataclass(frozen=True)
class Stages:
    """What the shared stages made: everything a training run reads besides its config."""

    corpus_dir: Path
    """The built corpus (``run.dir/corpus``)."""
    base_path: str
    """``from_pretrained`` path of the base model (a hub id, or a folder: ``tiny`` is built into the cache)."""
    cache_dir: Path
    """The tokenised cache of the corpus's train split."""
    cache_meta: dict
    """The cache's ``meta.json`` (per-source counts), with ``tokenised_now``."""
    base_uri: str | None = None
    """Where nodes that cannot see ``base_path`` download the base from (``run.storage`` a URI); else None."""
    node: str | None = None
    """The Ray node whose disk holds these files when no filesystem is shared (the driver's); else None."""


def prepare(cfg: Config) -> Path:
    """Writes the sample files if the config asks for them, then builds (or reuses) the corpus."""
    from bioray.corpus import build_corpus
    from bioray.corpus.sample import write_sample

    if cfg.corpus.sample_dir:
        write_sample(cfg.corpus.sample_dir)
    if not cfg.corpus.sources:
        raise DataError("config key 'corpus.sources': expected at least one source, got none")
    return build_corpus(cfg)


def shared_stages(cfg: Config) -> Stages:
    """Corpus, base model and tokenised cache: built once, or found up to date."""
    from bioray.data import tokenise
    from bioray.model import resolve_base

    corpus_dir = prepare(cfg)
    base_path = resolve_base(cfg, corpus_dir)
    cache_dir, cache_meta = tokenise(cfg, corpus_dir, base_path)
    base_uri = node = None
    if not shared_filesystem(cfg.run.storage):
        import ray

        node = ray.get_runtime_context().get_node_id()
        # No filesystem every node sees: what the driver built goes to the bucket. The base model is
        # what other nodes read (training workers and scorers download it once per node); the corpus
        # and the tokenised cache are read on the driver's node only (bioray.storage.file_task_options)
        # and copied for the record and for the tools that read a run's folder.
        started = time.time()
        if Path(base_path).is_dir():
            base_uri = publish_folder(base_path, cfg.run.storage, "models")
        publish_folder(corpus_dir, cfg.run.storage, "corpus")
        publish_folder(cache_dir, cfg.run.storage, "tokenised")
        log.info("base model, corpus and tokenised cache on %s (%.1f s)", cfg.run.storage, time.time() - started)
    return Stages(corpus_dir, base_path, cache_dir, cache_meta, base_uri, node)


def pool_name(cfg: Config) -> str:
    """A scorer-pool name unique to this run folder (two runs on one cluster never share actors)."""
    return "scorer-" + hashlib.sha256(str(Path(cfg.run.dir).resolve()).encode()).hexdigest()[:12]


def finetune(cfg: Config) -> dict:
    """Prepare, tokenise, train with checkpoint scoring, and write ``result.json``.

    Returns:
        The content of ``result.json``.
    """
    from bioray.evaluate.pool import start_pool, stop_pool

    # First, so that a run that fails in a stage still says what it was asked to do.
    write_text(Path(cfg.run.dir).resolve() / CONFIG_FILE, dump(cfg))
    stages = shared_stages(cfg)
    name = pool_name(cfg)
    actors = start_pool(cfg, stages.base_path, stages.corpus_dir, name, stages.base_uri)
    try:
        return train_and_score(cfg, stages, name)
    finally:
        stop_pool(actors)


def train_and_score(cfg: Config, stages: Stages, pool: str, tune_reports: bool = False,
                    group: str | None = None) -> dict:
    """Trains one config on the shared stages, its checkpoints scored by the named scorer pool.

    What a run does after the shared stages; a Tune trial calls it with its own config (and
    ``tune_reports``: every training report, with the latest task score, goes to Tune; ``group``:
    the search's name, which the trackers group its trials under).
    Writes ``result.json``, ``scores.md``, ``report.md``, ``curves.png`` under ``cfg.run.dir``
    (the caller writes ``bioray.yaml``).
    """
    from bioray.corpus import read_manifest
    from bioray.data import training_dataset
    from bioray.evaluate.pool import source_decoding, task_score, validate_checkpoint
    from bioray.observe import log_best, start_metrics_log, stop_metrics_log
    from bioray.report import score_table
    from bioray.track import trackers
    from bioray.train import fit

    run_dir = Path(cfg.run.dir).resolve()
    optimizer_class(cfg.train.optimizer)  # a name torch does not know fails here, not in every worker
    train_ds, plan = training_dataset(cfg, stages.cache_dir, node=stages.node)
    if cfg.train.epochs is not None:
        train_ds = train_ds.materialize()
        cfg = with_steps_for_epochs(cfg, train_ds.count())
    check_resume(cfg)
    # The one writer of metrics.jsonl and tensorboard/ (see bioray.observe for who sends what), and
    # of the trackers' runs.
    metrics_log = start_metrics_log(run_dir, trackers(cfg.track, to_dict(cfg), run_dir,
                                                      cfg.run.name or run_dir.name, group))
    scoring = {"pool": pool, "num_actors": cfg.eval.num_actors, "config": _json_safe(to_dict(cfg))}
    start = time.time()
    try:
        result = fit(cfg, stages.base_path, train_ds, validate_checkpoint, scoring, metrics_log=metrics_log,
                     tune_reports=tune_reports, base_uri=stages.base_uri)
        if result.error:
            raise result.error
        best, best_metrics = _best_scored(result)
        if best_metrics.get("eval") is None:
            # Scoring did not come back with the checkpoint (e.g. the task failed): score it now.
            import ray

            log.warning("checkpoint %s has no task score yet; scoring it now", best.path)
            results = validate_checkpoint(best, **scoring)["eval"]
            best_metrics = {**best_metrics, "eval": results, "score": task_score(cfg, results)}
            if best_metrics.get("step") is not None:
                ray.get(metrics_log.scores.remote(best_metrics["step"], best_metrics["score"], results,
                                                  Path(best.path).name))
        log_best(metrics_log, full_uri(best.path, cfg.run.storage), best_metrics.get("step"),
                 best_metrics.get("score"))
    finally:
        records = stop_metrics_log(metrics_log, run_dir)
    final = result.metrics or {}
    out = {
        "train": {
            "first_loss": final.get("first_loss"), "last_loss": final.get("loss"), "steps": final.get("step"),
            "tokens_per_s": final.get("run_tokens_per_s"), "seconds": round(time.time() - start, 1),
        },
        "eval": best_metrics["eval"],
        "score": best_metrics.get("score"),
        "best_checkpoint": full_uri(best.path, cfg.run.storage),
        "checkpoints": [{"path": full_uri(c.path, cfg.run.storage), "step": m.get("step"), "score": m.get("score")}
                        for c, m in result.best_checkpoints],
        "mixture": plan,
        "data": {"cache": str(stages.cache_dir), "tokenised_now": stages.cache_meta["tokenised_now"],
                 "records": stages.cache_meta["records"]},
        "decoding": cfg.eval.decoding,
        "decoding_by_source": source_decoding(cfg, read_manifest(stages.corpus_dir)),
        "split": cfg.eval.split,
    }
    write_json(run_dir / "result.json", out)
    table = score_table(cfg, out["eval"])
    write_text(run_dir / "scores.md", table + "\n")
    write_run_report(cfg, out, records, run_dir)
    publish_run(cfg, run_dir)
    if not tune_reports:
        print(table)
    return out


RUN_FILES = (CONFIG_FILE, "result.json", "scores.md", "report.md", "curves.png", "metrics.jsonl", "tensorboard")
"""What a finished run's folder holds besides checkpoints: copied to ``<run.storage>/<run name>/`` there."""


def publish_run(cfg: Config, run_dir: Path) -> None:
    """Copies the run's result files beside its checkpoints on ``run.storage`` (a URI or another folder)."""
    if not cfg.run.storage:
        return
    root = run_root(cfg.run.dir, cfg.run.storage, cfg.run.name)
    if not is_uri(root) and Path(root) == run_dir:
        return
    for name in RUN_FILES:
        if (run_dir / name).exists():
            upload(run_dir / name, f"{root}/{name}")
    log.info("result files on %s", root)


def with_steps_for_epochs(cfg: Config, rows: int) -> Config:
    """``cfg`` with ``train.max_steps`` worked out from ``train.epochs`` and the packed epoch's rows.

    Each rank gets ``rows // num_workers`` rows (equal shards), read in micro-batches of
    ``train.micro_batch_size``; an optimizer step takes ``train.grad_accum`` of them.
    """
    import math
    from dataclasses import replace

    t = cfg.train
    per_rank = math.ceil((rows // t.num_workers) / t.micro_batch_size)
    steps = max(1, math.ceil(t.epochs * per_rank / t.grad_accum))
    log.info("train.epochs %g: %d micro-batches per rank per epoch, %d optimizer steps", t.epochs, per_rank, steps)
    return replace(cfg, train=replace(t, max_steps=steps))


def check_resume(cfg: Config) -> str | None:
    """Decides whether this run continues from its latest checkpoint, before anything trains.

    A checkpoint in the run's folder is continued only when it was made by this very run: the
    same training keys (``checkpoint.first_difference``). With ``run.resume: false`` (``--fresh``)
    the old checkpoints are moved aside, never deleted, and training starts at step 0.

    Returns:
        The checkpoint the run will continue from, or None for a fresh start.

    Raises:
        ConfigError: a training key differs from the checkpoint's, naming the first one.
    """
    import yaml

    root = run_root(cfg.run.dir, cfg.run.storage, cfg.run.name)
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    if not cfg.run.resume:
        log.info("starting afresh: moved the earlier checkpoints to %s", move_aside(root))
        return None
    try:
        state = json.loads(read_text(f"{latest}/{STATE_FILE}"))
        check_made_by(state.get("bioray_version") if isinstance(state, dict) else None, f"{latest}/{STATE_FILE}")
        # Through the schema, so a key the checkpoint's bioray predates reads as its default.
        saved = from_dict(yaml.safe_load(read_text(f"{latest}/{CONFIG_FILE}")) or {})
    except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError, ConfigError):
        raise CheckpointError(f"{latest}: cannot read its {CONFIG_FILE} or {STATE_FILE}; pass --fresh to start "
                              f"afresh") from None
    diff = first_difference(yaml.safe_load(dump(saved)), yaml.safe_load(dump(cfg)))
    if diff is not None:
        key, was, now = diff
        raise ConfigError(f"config key '{key}': {now!r} here, but the run being resumed in {latest} has {was!r}; "
                          f"rerun with the same value, or with --fresh to start afresh (the old checkpoints "
                          f"are moved aside)")
    log.info("resuming from %s", latest)
    return latest


def write_run_report(cfg: Config, result: dict, records: list[dict], run_dir: Path) -> None:
    """``report.md`` and ``curves.png``: the run at a glance, readable without a notebook."""
    from bioray.report import run_report, write_curves

    title = f"{cfg.run.dir}: {cfg.model.name_or_path}, {cfg.train.max_steps} steps"
    write_via(run_dir / "curves.png", lambda tmp: write_curves(records, tmp, title=title))
    write_text(run_dir / "report.md", run_report(cfg, result, records))
    log.info("report: %s (curves: %s)", run_dir / "report.md", run_dir / "curves.png")


def _best_scored(result):
    """The best checkpoint by task score (falls back to the latest when none was scored)."""
    scored = [(c, m) for c, m in result.best_checkpoints if m.get("score") is not None]
    if scored:
        return max(scored, key=lambda cm: (cm[1]["score"], cm[1].get("step", 0)))
    if result.checkpoint is None:
        raise CheckpointError("training reported no checkpoint")
    metrics = dict(next((m for c, m in result.best_checkpoints if c.path == result.checkpoint.path), {}))
    return result.checkpoint, metrics


def _json_safe(data):
    """Config dicts go through JSON (validation fn kwargs): keys become strings, which from_dict accepts."""
    return json.loads(json.dumps(data))


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """Scores a checkpoint folder on the config's corpus with the scorer pool; writes ``eval.json``."""
    from bioray.evaluate.pool import run_pool, start_pool, stop_pool, task_score

    # A folder, or a URI on run.storage: checked here, read by each scorer where it runs.
    where = checkpoint if is_uri(checkpoint) else str(Path(checkpoint).resolve())
    with local_copy(where) as ckpt:
        verify(ckpt)
        base = check_base(ckpt, cfg.model.name_or_path, named_by="config key 'model.name_or_path'")
        check_revision(ckpt, cfg.model.revision, "config key 'model.revision'")
    check_base_exists(where, base)
    corpus_dir = prepare(cfg)
    actors = start_pool(cfg, base, corpus_dir, pool_name(cfg) + "-eval")
    try:
        results, predictions = run_pool(actors, where)
    finally:
        stop_pool(actors)
    return _write_eval(cfg, results, {"checkpoint": where, "score": task_score(cfg, results)}, predictions)


def evaluate_predictions(cfg: Config, predictions_file: str) -> dict:
    """Scores a predictions JSONL file (``{"id", "prediction"}`` per line) exactly as generated text."""
    from bioray.corpus import read_manifest
    from bioray.evaluate.pool import eval_items, score_predictions, task_score

    corpus_dir = prepare(cfg)
    items = eval_items(cfg, corpus_dir)
    predictions = read_predictions(Path(predictions_file), {i["id"] for i in items}, cfg)
    results = score_predictions(cfg, read_manifest(corpus_dir), items, predictions)
    return _write_eval(cfg, results, {"predictions": str(Path(predictions_file).resolve()),
                                      "score": task_score(cfg, results)}, None)


def read_predictions(path: Path, known_ids: set[str], cfg: Config) -> dict[str, str]:
    """Reads and checks a predictions file.

    Raises:
        DataError: naming the file and line of the first bad line (not JSON, missing or non-string
            fields, an id outside the eval set, a duplicate id).
    """
    out: dict[str, str] = {}
    for n, obj in prediction_lines(path):
        if obj["id"] not in known_ids:
            raise DataError(f"{path}:{n}: id {quote(obj['id'])} is not in the eval set "
                            f"(split {cfg.eval.split}, eval.max_examples={cfg.eval.max_examples})")
        if obj["id"] in out:
            raise DataError(f"{path}:{n}: id {quote(obj['id'])} appears twice")
        out[obj["id"]] = obj["prediction"]
    missing = len(known_ids) - len(out)
    if missing:
        log.warning("%s: %d eval records have no prediction; they count as unparsable answers", path, missing)
    return out


def prediction_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, {"id", "prediction"})`` per non-blank line of a predictions file, its form checked.

    Raises:
        DataError: naming the file and the line: missing, not UTF-8, not JSON, or missing fields.
    """
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{n}: expected a JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) \
                    or not isinstance(obj.get("prediction"), str):
                raise DataError(f"{path}:{n}: expected {{\"id\": string, \"prediction\": string}}")
            yield n, obj


def _write_eval(cfg: Config, results: dict, extra: dict, predictions: dict | None) -> dict:
    from bioray.report import score_table

    run_dir = Path(cfg.run.dir).resolve()
    from bioray.corpus import read_manifest
    from bioray.evaluate.pool import source_decoding

    manifest = read_manifest(Path(cfg.run.dir).resolve() / "corpus")
    out = {"eval": results, **extra, "decoding": cfg.eval.decoding,
           "decoding_by_source": source_decoding(cfg, manifest), "split": cfg.eval.split}
    write_json(run_dir / "eval.json", out)
    if predictions is not None:
        write_text(run_dir / "predictions.jsonl",
                   "".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in sorted(predictions.items())))
    table = score_table(cfg, results)
    write_text(run_dir / "eval.md", table + "\n")
    print(table)
    return out


# ------------------------------------------------------------------------ before Ray starts


def check_inputs(cfg: Config, job: str, checkpoint: str | None = None, predictions: str | None = None) -> None:
    """Checks every input a job will read, before Ray starts or a model loads (STYLE.md rule 12).

    Light on purpose: nothing here imports Ray or torch (tests/test_errors.py holds every job to
    that), so a typo costs a second. It writes one thing: the sample corpus, where
    ``corpus.sample_dir`` asks for it, so that the source files can be checked.

    Args:
        cfg: The job's config.
        job: prepare | finetune | evaluate | tune.
        checkpoint: ``evaluate --checkpoint``: a folder, or a URI (checked once Ray runs).
        predictions: ``evaluate --predictions``.

    Raises:
        BiorayError: the first bad input, in one line naming the key, the file or the line.
    """
    from bioray.corpus.sample import check_sample_dir, write_sample
    from bioray.corpus.sources import check_sources
    from bioray.model import check_model_folder, local_model
    from bioray.storage import check_storage
    from bioray.track import check_trackers

    _check_run_dir(Path(cfg.run.dir))
    if not cfg.corpus.sources:
        raise DataError("config key 'corpus.sources': expected at least one source, got none")
    if cfg.corpus.sample_dir:
        check_sample_dir(cfg.corpus.sample_dir)
    if job != "prepare":
        _check_eval_split(cfg)
        folder = local_model(cfg.model.name_or_path)
        if folder is not None:
            check_model_folder(folder, cfg, "config key 'model.name_or_path'")
    if job in ("finetune", "tune"):
        check_storage(cfg.run.storage)
        check_trackers(cfg.track)
    if job == "tune":
        _check_search_space(cfg)
    if checkpoint is not None and not is_uri(checkpoint):
        folder = Path(checkpoint).resolve()
        base = check_base(folder, cfg.model.name_or_path, named_by="config key 'model.name_or_path'")
        check_base_exists(folder, base)
        check_revision(folder, cfg.model.revision, "config key 'model.revision'")
    if predictions is not None:
        for _ in prediction_lines(Path(predictions)):
            pass
    if cfg.corpus.sample_dir:
        write_sample(cfg.corpus.sample_dir)
    check_sources(cfg)


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"config key 'run.dir': {run_dir} is a file; expected a folder for the run's outputs")
    existing = next(p for p in (run_dir.resolve(), *run_dir.resolve().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'run.dir': {run_dir} cannot be written ({existing} is read-only)")


def _check_eval_split(cfg: Config) -> None:
    """Some source must have the split that checkpoints are scored on, or training ends unscored."""
    split = cfg.eval.split
    if not any(split in s.split_names() for s in cfg.corpus.sources):
        have = sorted({k for s in cfg.corpus.sources for k in s.split_names()})
        raise ConfigError(f"config key 'eval.split': no source has a {split!r} file; set it to one the sources "
                          f"have ({', '.join(have)})")


def _check_search_space(cfg: Config) -> None:
    """A search with something to search: the same rule as ``bioray.tune.param_space``, before any stage runs."""
    t = cfg.tune
    weighted = [s for s in cfg.corpus.sources if "train" in s.split_names() and cfg.source_weight(s.name) > 0]
    keys = {s.task if cfg.mixture.by == "task" else s.name for s in weighted}
    if t.lr is None and t.rank is None and not t.space and not (t.mixture and len(keys) > 1):
        raise ConfigError("config key 'tune': nothing to search (tune.lr, tune.rank and tune.space are null or "
                          "empty, and tune.mixture needs two weighted sources)")
