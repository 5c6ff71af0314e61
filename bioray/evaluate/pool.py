"""The evaluation actor pool: score checkpoints at the tasks, while training goes on.

Each ``Scorer`` actor loads the base model once and swaps LoRA adapters per checkpoint. The
held-out records are split across actors (every k-th record); a caller gathers the
predictions and any actor scores them. Ray Train calls :func:`validate_checkpoint` as the
``ValidationConfig`` fn for every reported checkpoint; ``jobs/evaluate.py`` uses the same pool.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from bioray.config import Config, from_dict, to_dict
from bioray.errors import CheckpointError, DataError
from bioray.storage import local_copy

log = logging.getLogger("bioray")

NAMESPACE = "bioray"


def eval_items(cfg: Config, corpus_dir: Path) -> list[dict]:
    """The held-out records every checkpoint is scored on: ``eval.split``, ``eval.max_examples`` per source.

    Each keeps its instruction and input; a scorer lays out the prompts with its tokenizer
    (``Generator.prompts``), as a chat template needs one.
    """
    from bioray.corpus import read_manifest, read_records

    manifest = read_manifest(corpus_dir)
    items = []
    for source in cfg.corpus.sources:
        if cfg.eval.split not in manifest["sources"].get(source.name, {}).get("splits", {}):
            continue
        for r in read_records(corpus_dir, source.name, cfg.eval.split, limit=cfg.eval.max_examples):
            items.append({"id": r["id"], "source": r["source"], "task": r["task"], "instruction": r["instruction"],
                          "input": r["input"], "output": r["output"]})
    return items


def score_predictions(cfg: Config, manifest: dict, items: list[dict], predictions: dict[str, str]) -> dict:
    """Scores predictions (id -> answer text) per source with the source's own metric.

    A record without a prediction is scored as an empty (unparsable) answer.

    Returns:
        ``{source: {metric: value}}`` with one entry per source that has eval records.
    """
    from bioray.evaluate.metrics import score_source

    by_source: dict[str, list[dict]] = {}
    for item in items:
        by_source.setdefault(item["source"], []).append(item)
    sources = {s.name: s for s in cfg.corpus.sources}
    results = {}
    for name, group in by_source.items():
        src, info = sources[name], manifest["sources"][name]
        labels = info.get("labels")
        results[name] = score_source(
            src.task, [i["input"] for i in group], [i["output"] for i in group],
            [predictions.get(i["id"], "") for i in group],
            label_space=labels if src.task != "ner" else None,
            negative_label=src.negative_label, none_label=src.none_label,
            allowed_tags=labels if src.task == "ner" else None,
        )
    return results


def answer_specs(cfg: Config, manifest: dict, items: list[dict]) -> list:
    """Each record's answer space for constrained decoding, from its source's task and manifest labels."""
    from bioray.evaluate.constrained import answer_spec

    sources = {s.name: s for s in cfg.corpus.sources}
    return [answer_spec(i["task"], i["input"], manifest["sources"][i["source"]].get("labels"),
                        sources[i["source"]].none_label) for i in items]


def source_decoding(cfg: Config, manifest: dict) -> dict[str, str]:
    """How each source's answers are produced under ``cfg.eval.decoding`` (for ``eval.json``).

    Returns:
        ``{source: method}``: ``free`` (generated, then parsed), or under constrained decoding
        ``constrained-tags``, ``constrained-choice``, ``constrained-list``, or ``free`` where a
        source has no answer space to constrain to (qa).
    """
    from bioray.evaluate.constrained import answer_spec

    out = {}
    for s in cfg.corpus.sources:
        if s.name not in manifest["sources"]:
            continue
        kind = answer_spec(s.task, "x", manifest["sources"][s.name].get("labels"), s.none_label).kind
        out[s.name] = "free" if cfg.eval.decoding == "free" or kind == "free" else f"constrained-{kind}"
    return out


def task_score(cfg: Config, results: dict) -> float:
    """The one number checkpoints are ranked by (``eval.score``)."""
    from bioray.evaluate.metrics import checkpoint_score

    return checkpoint_score(results, {s.name: s.task for s in cfg.corpus.sources}, cfg.eval.score)


class Scorer:
    """One scorer: a base model loaded once, a slice of the eval records, predictions per checkpoint."""

    def __init__(self, config: dict, base_path: str, manifest: dict, items: list[dict], shard: int, num_shards: int,
                 base_uri: str | None = None):
        import torch

        from bioray.evaluate.generate import Generator
        from bioray.storage import node_copy

        self.cfg = from_dict(config)
        self.manifest = manifest
        self.all_items = items
        self.items = items[shard::num_shards]
        device = "cuda" if self.cfg.eval.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(self.cfg.eval.cpus_per_actor + 0.5)))
        self.generator = Generator(base_path, self.cfg, device=device, load_from=node_copy(base_path, base_uri))
        tok = self.generator.tokenizer
        answer_lens = [len(x) for x in tok([i["output"] for i in self.items], add_special_tokens=False)["input_ids"]] \
            if self.items else []
        cap = self.cfg.eval.max_new_tokens
        # A generous length cap from the reference answer (x1.5 + 8): long enough for any
        # well-formed answer, short enough that a rambling model cannot stall the pool.
        self.max_new = [cap if cap else int(n * 1.5) + 8 for n in answer_lens]
        self.specs = answer_specs(self.cfg, manifest, self.items) if self.cfg.eval.decoding == "constrained" else None

    def predict(self, checkpoint) -> dict[str, str]:
        """Answers for this actor's records under ``checkpoint`` (a Ray ``Checkpoint`` or a folder)."""
        if not self.items:
            return {}
        if isinstance(checkpoint, (str, Path)):
            with local_copy(str(checkpoint)) as d:  # a folder, or a URI on object storage
                self.generator.use(d)
        else:
            with checkpoint.as_directory() as d:
                self.generator.use(d)
        start = time.time()
        prompts = self.generator.prompts(self.items)
        if self.specs is None:
            answers = self.generator.generate(prompts, self.max_new, self.cfg.eval.batch_size, self.cfg.eval.num_beams)
        else:
            answers = self.generator.constrained(prompts, self.specs, self.max_new, self.cfg.eval.batch_size,
                                                 self.cfg.eval.num_beams)
        log.info("answered %d examples (%s decoding) in %.1fs (%.1f examples/s)", len(answers),
                 self.cfg.eval.decoding, time.time() - start, len(answers) / max(time.time() - start, 1e-9))
        return {i["id"]: a for i, a in zip(self.items, answers)}

    def score(self, predictions: dict[str, str]) -> dict:
        """Metrics per source for the whole eval set."""
        return score_predictions(self.cfg, self.manifest, self.all_items, predictions)


def start_pool(cfg: Config, base_path: str, corpus_dir: Path, name: str, base_uri: str | None = None) -> list:
    """Starts ``eval.num_actors`` named scorer actors (reused if already running under ``name``).

    ``base_uri``: where actors on a node that cannot see ``base_path`` download the base from.
    """
    from bioray.corpus import read_manifest

    manifest = read_manifest(corpus_dir)
    items = eval_items(cfg, corpus_dir)
    items_ref = ray.put(items)
    n = cfg.eval.num_actors
    remote = ray.remote(Scorer)
    return [remote.options(name=f"{name}-{k}", namespace=NAMESPACE, get_if_exists=True,
                           num_cpus=cfg.eval.cpus_per_actor, num_gpus=cfg.eval.gpus_per_actor)
            .remote(to_dict(cfg), base_path, manifest, items_ref, k, n, base_uri) for k in range(n)]


def run_pool(actors: list, checkpoint) -> dict:
    """Predictions from every actor for ``checkpoint``, then the scores."""
    predictions: dict[str, str] = {}
    for part in ray.get([a.predict.remote(checkpoint) for a in actors]):
        predictions.update(part)
    return ray.get(actors[0].score.remote(predictions)), predictions


def validate_checkpoint(checkpoint, pool: str, num_actors: int, config: dict) -> dict:
    """Ray Train ``ValidationConfig`` fn: scores one reported checkpoint with the named pool.

    Returns:
        ``{"score": float, "eval": {source: {metric: value}}}``, merged into the checkpoint's metrics.
    """
    cfg = from_dict(config)
    actors = [ray.get_actor(f"{pool}-{k}", namespace=NAMESPACE) for k in range(num_actors)]
    results, _ = run_pool(actors, checkpoint)
    return {"score": task_score(cfg, results), "eval": results}


def stop_pool(actors: list) -> None:
    for a in actors:
        ray.kill(a)


__all__ = ["CheckpointError", "DataError", "Scorer", "answer_specs", "eval_items", "run_pool", "score_predictions",
           "source_decoding", "start_pool", "stop_pool", "task_score", "validate_checkpoint"]
