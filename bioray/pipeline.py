"""The stages wired together for the jobs: prepare, finetune, evaluate.

``jobs/*.py`` parse arguments and call these; a Tune trial calls the same pieces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from bioray.config import Config, dump, to_dict
from bioray.errors import CheckpointError, DataError

log = logging.getLogger("bioray")


def write_text(path: Path, text: str) -> None:
    """Writes text under a temporary name, then renames: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """:func:`write_text` for JSON."""
    write_text(path, json.dumps(data, indent=2))


def prepare(cfg: Config) -> Path:
    """Writes the sample files if the config asks for them, then builds (or reuses) the corpus."""
    from bioray.corpus import build_corpus
    from bioray.corpus.sample import write_sample

    if cfg.corpus.sample_dir:
        write_sample(cfg.corpus.sample_dir)
    if not cfg.corpus.sources:
        raise DataError("config key 'corpus.sources': expected at least one source, got none")
    return build_corpus(cfg)


def pool_name(cfg: Config) -> str:
    """A scorer-pool name unique to this run folder (two runs on one cluster never share actors)."""
    return "scorer-" + hashlib.sha256(str(Path(cfg.run.dir).resolve()).encode()).hexdigest()[:12]


def finetune(cfg: Config) -> dict:
    """Prepare, tokenise, train with checkpoint scoring, and write ``result.json``.

    Returns:
        The content of ``result.json``.
    """
    from bioray.data import tokenise
    from bioray.evaluate.pool import start_pool, stop_pool
    from bioray.model import resolve_base

    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "bioray.yaml", dump(cfg))
    corpus_dir = prepare(cfg)
    base_path = resolve_base(cfg, corpus_dir)
    cache_dir, cache_meta = tokenise(cfg, corpus_dir, base_path)
    name = pool_name(cfg)
    actors = start_pool(cfg, base_path, corpus_dir, name)
    try:
        return train_and_score(cfg, base_path, corpus_dir, cache_dir, cache_meta, name)
    finally:
        stop_pool(actors)


def train_and_score(cfg: Config, base_path: str, corpus_dir: Path, cache_dir: Path, cache_meta: dict,
                    pool: str, tune_reports: bool = False) -> dict:
    """Trains one config on a tokenised cache, its checkpoints scored by the named scorer pool.

    What a run does after the shared stages; a Tune trial calls it with its own config (and
    ``tune_reports``: every training report, with the latest task score, goes to Tune).
    Writes ``result.json``, ``scores.md``, ``report.md``, ``curves.png`` under ``cfg.run.dir``.
    """
    from bioray.corpus import read_manifest
    from bioray.evaluate.pool import source_decoding, task_score, validate_checkpoint
    from bioray.observe import start_metrics_log, stop_metrics_log
    from bioray.report import score_table
    from bioray.train import fit

    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "bioray.yaml", dump(cfg))
    # The one writer of metrics.jsonl and tensorboard/ (see bioray.observe for who sends what).
    metrics_log = start_metrics_log(run_dir)
    scoring = {"pool": pool, "num_actors": cfg.eval.num_actors, "config": _json_safe(to_dict(cfg))}
    start = time.time()
    try:
        result, plan = fit(cfg, base_path, cache_dir, validate_checkpoint, scoring, metrics_log=metrics_log,
                           tune_reports=tune_reports)
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
        "best_checkpoint": _abs(best.path),
        "checkpoints": [{"path": _abs(c.path), "step": m.get("step"), "score": m.get("score")}
                        for c, m in result.best_checkpoints],
        "mixture": plan,
        "data": {"cache": str(cache_dir), "tokenised_now": cache_meta["tokenised_now"],
                 "records": cache_meta["records"]},
        "decoding": cfg.eval.decoding,
        "decoding_by_source": source_decoding(cfg, read_manifest(corpus_dir)),
        "split": cfg.eval.split,
    }
    write_json(run_dir / "result.json", out)
    table = score_table(cfg, out["eval"])
    write_text(run_dir / "scores.md", table + "\n")
    write_run_report(cfg, out, records, run_dir)
    if not tune_reports:
        print(table)
    return out


def write_run_report(cfg: Config, result: dict, records: list[dict], run_dir: Path) -> None:
    """``report.md`` and ``curves.png``: the run at a glance, readable without a notebook."""
    from bioray.report import run_report, write_curves

    fd, tmp = tempfile.mkstemp(prefix=".curves-", suffix=".png", dir=run_dir)
    os.close(fd)
    write_curves(records, Path(tmp), title=f"{cfg.run.dir}: {cfg.model.name_or_path}, {cfg.train.max_steps} steps")
    os.replace(tmp, run_dir / "curves.png")
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


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _json_safe(data):
    """Config dicts go through JSON (validation fn kwargs): keys become strings, which from_dict accepts."""
    return json.loads(json.dumps(data))


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """Scores a checkpoint folder on the config's corpus with the scorer pool; writes ``eval.json``."""
    from bioray.evaluate.generate import base_key, checkpoint_base
    from bioray.evaluate.pool import run_pool, start_pool, stop_pool, task_score
    ckpt = Path(checkpoint).resolve()
    base = checkpoint_base(ckpt)
    wanted = cfg.model.name_or_path
    if wanted != "tiny" and base_key(wanted) != base_key(base):
        raise CheckpointError(f"{ckpt}: checkpoint was made for base model {base!r}, but config key "
                              f"'model.name_or_path' names {wanted!r}")
    corpus_dir = prepare(cfg)
    if wanted == "tiny" and not Path(base).is_dir():
        raise CheckpointError(f"{ckpt}: its base model folder {base!r} no longer exists; rebuild it with "
                              f"jobs/finetune.py or point model.name_or_path at a copy")
    actors = start_pool(cfg, base, corpus_dir, pool_name(cfg) + "-eval")
    try:
        results, predictions = run_pool(actors, str(ckpt))
    finally:
        stop_pool(actors)
    return _write_eval(cfg, results, {"checkpoint": str(ckpt), "score": task_score(cfg, results)}, predictions)


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
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    out: dict[str, str] = {}
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
            if obj["id"] not in known_ids:
                raise DataError(f"{path}:{n}: id {obj['id']!r} is not in the eval set "
                                f"(split {cfg.eval.split}, eval.max_examples={cfg.eval.max_examples})")
            if obj["id"] in out:
                raise DataError(f"{path}:{n}: id {obj['id']!r} appears twice")
            out[obj["id"]] = obj["prediction"]
    missing = len(known_ids) - len(out)
    if missing:
        log.warning("%s: %d eval records have no prediction; they count as unparsable answers", path, missing)
    return out


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

