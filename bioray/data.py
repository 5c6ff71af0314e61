"""Tokenise once (Ray Data, cached), mix sources by weight, and pack examples into sequences.

Data flow: corpus Parquet -> ``tokenise`` (class UDF: each actor loads the tokenizer once) ->
cache ``<cache>/tokenised/<key>/`` -> ``training_dataset`` (per-source sampling by
``mixture.weights``, shuffle, first-fit-decreasing packing) -> ``ray.train`` shards.

Packing happens in Ray Data, not in the worker: Ray Train's default ``streaming_split(equal=True)``
gives every worker the same number of rows, so rows must already be training sequences for every
worker to run the same number of batches (uneven batch counts hang the collectives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bioray import tempdirs
from bioray.config import Config
from bioray.corpus.read import LIGHT_CPUS
from bioray.errors import ConfigError, DataError
from bioray.storage import file_task_options

log = logging.getLogger("bioray")

TOKENISE_VERSION = "1"
IGNORE_INDEX = -100  # labels value that the loss skips (transformers' convention)
TMP_NAME = ".tokenise-tmp"  # a cache entry being written (bioray.tempdirs naming)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how text becomes ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


# Worker-process cache of Rust tokenizers by fingerprint: Ray reuses worker processes across
# tasks, so each process parses a tokenizer's JSON once.
_BACKENDS: dict[str, object] = {}
_COLUMNS = ["id", "source", "task", "instruction", "input", "output"]


class Tokenise:
    """Ray Data UDF: corpus records -> ``input_ids`` and ``labels`` (loss on the answer only).

    Built in the driver from the loaded tokenizer. Where the tokenizer has a Rust backend that
    gives the same ids as the transformers call (checked on sample texts), the workers rebuild
    only that backend from its JSON: no transformers import, no Python work per token. Other
    tokenizers travel as they are and run through transformers.
    """

    def __init__(self, tokenizer, template: str, max_seq_len: int, overlong: str,
                 probe: Iterable[str] = (), threads: int | None = None, system_prompt: str | None = None):
        from bioray.corpus import PromptFormat

        self.format = PromptFormat(template, tokenizer, system_prompt)
        self.max_len, self.overlong = max_seq_len, overlong
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend_json = backend.to_str() if backend is not None and _backend_agrees(tokenizer, probe) else None
        self.tokenizer = tokenizer if self.backend_json is None else None
        self.threads = threads

    @property
    def uses_backend(self) -> bool:
        return self.backend_json is not None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend_json is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        backend = _BACKENDS.get(self.fingerprint)
        if self.threads == 1:
            # One CPU asked, one thread used (as Ray sets OMP_NUM_THREADS): the Rust tokenizer
            # otherwise spreads every task over all cores and the tasks fight for them.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if backend is None:
            from tokenizers import Tokenizer

            backend = _BACKENDS[self.fingerprint] = Tokenizer.from_str(self.backend_json)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["instruction", "input", "output"]).to_pydict()
        prompt_ids = self._encode(self.format.render(rows["instruction"], rows["input"]))
        answer_ids = self._encode(rows["output"])
        # The answer's end (EOS, or a chat template's end of turn) is labelled: generation learns to stop.
        head, eos = self.format.head, [self.format.end]
        keep, ids_out, labels_out, truncated = [], [], [], []
        for k, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            p = head + p
            a = a + eos
            cut = False
            if len(p) + len(a) > self.max_len:
                # Never cut the answer: drop the record, or cut the prompt's start (after BOS). With
                # "error" it is dropped here and named by the driver (check_overlong).
                room = self.max_len - len(a) - len(head)
                if self.overlong != "truncate" or room < 8:
                    continue
                p, cut = head + p[len(p) - room:], True
            keep.append(k)
            ids_out.append(p + a)
            labels_out.append([IGNORE_INDEX] * len(p) + a)
            truncated.append(cut)
        picked = batch.select(["id", "source", "task"])
        if len(keep) < len(batch):
            picked = picked.take(pa.array(keep, pa.int64()))
        return picked.append_column("input_ids", pa.array(ids_out, pa.list_(pa.int32()))) \
            .append_column("labels", pa.array(labels_out, pa.list_(pa.int32()))) \
            .append_column("truncated", pa.array(truncated, pa.bool_()))


def _backend_agrees(tokenizer, texts: Iterable[str]) -> bool:
    """Whether the Rust backend alone gives the transformers call's ids on these texts."""
    texts = list(texts)
    if not texts:
        return False
    backend = tokenizer.backend_tokenizer
    direct = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return direct == tokenizer(texts, add_special_tokens=False)["input_ids"]


def probe_texts(corpus_dir: Path, prompts, n: int = 64) -> list[str]:
    """Prompts and answers of the first records: where the backend check looks.

    Args:
        corpus_dir: The built corpus.
        prompts: The run's :class:`~bioray.corpus.PromptFormat`.
        n: Records to take.
    """
    from bioray.corpus.read import shard_paths

    for path in shard_paths(corpus_dir):
        f = pq.ParquetFile(path)
        if f.metadata.num_row_groups:
            rows = f.read_row_group(0, columns=["instruction", "input", "output"]).slice(0, n).to_pydict()
            return prompts.render(rows["instruction"], rows["input"]) + rows["output"]
    return []


def tokenise(cfg: Config, corpus_dir: Path, base_path: str) -> tuple[Path, dict]:
    """Tokenises the corpus's train split once, or reuses the cache.

    One fused Ray Data task per block of about ``data.tokenise_batch_size`` records reads its
    Parquet row groups, tokenises them and writes the cache shard (read, tokenise and write
    ask the same CPUs, so Ray Data runs them as one task: no hand-over between processes).

    Args:
        cfg: The run's config.
        corpus_dir: The built corpus.
        base_path: Where the tokenizer loads from (the base model's folder or hub id).

    Returns:
        The cache folder and its meta (``meta["tokenised_now"]`` counts records tokenised by
        this call: 0 on a cache hit).
    """
    import ray

    from bioray.corpus import PromptFormat, corpus_dataset, read_manifest
    from bioray.model import cache_root, load_tokenizer

    manifest = read_manifest(corpus_dir)
    tokenizer = load_tokenizer(base_path, cfg)
    fmt = PromptFormat(cfg.corpus.template, tokenizer, cfg.corpus.system_prompt)  # no chat template: fails here
    key_parts = {
        "version": TOKENISE_VERSION, "corpus": manifest["content_hash"], "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": cfg.corpus.template, "max_seq_len": cfg.data.max_seq_len, "overlong": cfg.data.overlong,
    }
    if fmt.chat:
        # The vocabulary alone does not say how a chat template lays prompts out.
        key_parts.update(chat_template=tokenizer.chat_template, system_prompt=cfg.corpus.system_prompt)
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    out = cache_root(cfg) / "tokenised" / key
    meta = cached_meta(out)
    if meta is not None:
        log.info("tokenised cache hit: %s (%d records, nothing tokenised)", out, meta["records"])
        check_overlong(cfg, meta)
        return out, {**meta, "tokenised_now": 0}
    if out.exists():
        # Cut short or damaged (see cached_meta): replaced whole, never read half.
        log.warning("tokenised cache %s is incomplete; tokenising again", out)
        shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tempdirs.clean_stale(out.parent, TMP_NAME)
    tmp = tempdirs.make(out.parent, TMP_NAME)
    start = time.time()
    # A request larger than the whole cluster would wait forever (a 1-CPU laptop, say).
    cpus = min(cfg.data.tokenise_cpus, ray.cluster_resources().get("CPU", 1.0))
    # On the driver's node when no filesystem is shared: the corpus and the cache are its files.
    where = file_task_options(cfg.run.storage, cpus)
    cpus, place = where.pop("num_cpus"), where
    fn = Tokenise(tokenizer, cfg.corpus.template, cfg.data.max_seq_len, cfg.data.overlong,
                  probe=probe_texts(corpus_dir, fmt), threads=max(1, int(cpus)), system_prompt=cfg.corpus.system_prompt)
    if not fn.uses_backend:
        log.info("tokenising through transformers (the tokenizer has no Rust backend that gives the same ids)")
    try:
        ds = corpus_dataset(corpus_dir, split="train", columns=_COLUMNS, num_cpus=cpus,
                            rows_per_block=cfg.data.tokenise_batch_size, ray_remote_args=place)
        ds = ds.map_batches(fn, batch_size=None, batch_format="pyarrow", num_cpus=cpus,
                            concurrency=cfg.data.tokenise_tasks, **place)
        # Ray Data reserves a share of the cluster per operator; with the single fused operator
        # here that only idles CPUs (measured: one task at a time on 2 CPUs, twice the time).
        ds.context.op_resource_reservation_enabled = False
        ds.write_parquet(str(tmp / "data"), ray_remote_args={"num_cpus": cpus, **place})
        meta = _cache_meta(tmp / "data", manifest, key_parts, time.time() - start)
        if cfg.data.overlong == "error":
            _refuse_overlong(cfg, corpus_dir, tmp / "data", meta)
        check_overlong(cfg, meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out)
    except OSError:
        if not (out / "meta.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((out / "meta.json").read_text())
    log.info("tokenised %d records (%.2f M tokens) in %.1fs -> %s", meta["records"], meta["tokens"] / 1e6,
             meta["seconds"], out)
    return out, {**meta, "tokenised_now": meta["records"]}


def cached_meta(out: Path) -> dict | None:
    """A cache entry's ``meta.json`` if the entry is whole: the meta parses and its shards hold the
    rows it counts (read from their footers, not their data). None = tokenise again."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "data").glob("*.parquet"))
    except (OSError, ValueError, UnicodeDecodeError):  # pyarrow's ArrowInvalid is a ValueError
        return None
    return meta if isinstance(meta, dict) and meta.get("records") == rows else None


def check_overlong(cfg: Config, meta: dict) -> None:
    """Refuses a mix in which a weighted source has lost every training record to ``data.max_seq_len``.

    Training without it would silently leave it out of the mixture (and, with every source gone,
    have nothing to train on).

    Raises:
        DataError: naming the source, its dropped records and the keys that decide it.
    """
    for name, info in sorted(meta["sources"].items()):
        if info["records"] == 0 and info["dropped_overlong"] > 0 and cfg.source_weight(name) > 0:
            raise DataError(f"source {name!r}: all {info['dropped_overlong']} train records are longer than "
                            f"data.max_seq_len={cfg.data.max_seq_len} tokens and were dropped; raise "
                            f"data.max_seq_len, set data.overlong: truncate, or weigh it 0 in mixture.weights")


def _refuse_overlong(cfg: Config, corpus_dir: Path, data_dir: Path, meta: dict) -> None:
    """``data.overlong: error``: names the first record (by id) that is longer than ``data.max_seq_len``.

    Raises:
        DataError: a record did not fit.
    """
    dropped = {k: v["dropped_overlong"] for k, v in meta["sources"].items() if v["dropped_overlong"]}
    if not dropped:
        return
    from bioray.corpus.read import shard_paths

    name = min(dropped)
    kept = set(_read_column(sorted(str(p) for p in data_dir.glob("*.parquet")), "id", name))
    first = min(set(_read_column(shard_paths(corpus_dir), "id", name, split="train")) - kept)
    raise DataError(f"record {first}: longer than data.max_seq_len={cfg.data.max_seq_len} tokens (data.overlong: "
                    f"error; overlong train records: {sum(dropped.values())}); raise data.max_seq_len, or set "
                    f"data.overlong to drop or truncate")


def _read_column(paths: list[str], column: str, source: str, split: str | None = None) -> list[str]:
    if not paths:
        return []
    import pyarrow.dataset as pads

    where = pads.field("source") == source
    if split is not None:
        where = where & (pads.field("split") == split)
    return pads.dataset(paths, format="parquet").to_table(columns=[column], filter=where)[column].to_pylist()


def _cache_meta(data_dir: Path, manifest: dict, key_parts: dict, seconds: float) -> dict:
    """Counts per source, read back from the written shards (cheap: three columns)."""
    columns = ["source", "input_ids", "labels", "truncated"]
    shards = sorted(data_dir.glob("*.parquet"))
    # Every record dropped: Ray Data writes no shard, and a folder without one is no Parquet dataset.
    table = pq.read_table(shards, columns=columns) if shards else \
        pa.table({c: pa.array([], pa.string() if c == "source" else pa.bool_() if c == "truncated"
                               else pa.list_(pa.int32())) for c in columns})
    sources: dict[str, dict] = {}
    lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    trunc = table["truncated"].to_numpy(zero_copy_only=False)
    for name, info in manifest["sources"].items():
        if "train" not in info["splits"]:
            continue
        mask = pc.equal(table["source"], name).to_numpy(zero_copy_only=False)
        kept = int(mask.sum())
        sources[name] = {
            "records": kept,
            "dropped_overlong": info["splits"]["train"]["records"] - kept,
            "truncated": int(trunc[mask].sum()),
            "tokens": int(lengths[mask].sum()),
            "task": info["task"],
        }
    return {**key_parts, "records": int(len(table)), "tokens": int(lengths.sum()), "seconds": round(seconds, 3),
            "sources": sources}


# ------------------------------------------------------------------------------- mixing


def mixture_counts(cfg: Config, counts: dict[str, int], tasks: dict[str, str]) -> dict[str, int]:
    """How many records of each source one epoch draws.

    Weights key on source names (or tasks with ``mixture.by: task``, shared by a task's sources
    in proportion to their sizes); missing keys weigh 1.0. Without replacement the epoch is the
    largest one that the weights allow without repeating a record; with replacement it is
    ``mixture.epoch_size`` (default: all records) and small sources repeat.

    Raises:
        ConfigError: all weights are zero for the sources that have training data.
    """
    m = cfg.mixture
    if m.by == "task":
        per_task: dict[str, int] = {}
        for name, n in counts.items():
            per_task[tasks[name]] = per_task.get(tasks[name], 0) + n
        weights = {name: m.weight(tasks[name]) * n / max(per_task[tasks[name]], 1) for name, n in counts.items()}
    else:
        weights = {name: m.weight(name) for name in counts}
    weights = {k: w for k, w in weights.items() if w > 0 and counts[k] > 0}
    if not weights:
        raise ConfigError("config key 'mixture.weights': every source with training data weighs 0")
    total_w = sum(weights.values())
    shares = {k: w / total_w for k, w in weights.items()}
    if m.epoch_size is not None:
        size = m.epoch_size
    elif m.replacement:
        size = sum(counts[k] for k in shares)
    else:
        size = min(counts[k] / p for k, p in shares.items())
    out = {k: int(round(size * p)) for k, p in shares.items()}
    if not m.replacement:
        for k, n in out.items():
            if n > counts[k]:
                raise ConfigError(f"config key 'mixture.epoch_size': {size} needs {n} records of {k}, "
                                  f"which has {counts[k]}; set mixture.replacement: true")
    return out


def training_dataset(cfg: Config, cache_dir: Path, seed: int | None = None, node: str | None = None):
    """The mixed, shuffled and (optionally) packed training Dataset for one run or trial.

    ``node``: the node that holds ``cache_dir`` when no filesystem is shared (default: this one).
    """
    import ray

    meta = json.loads((cache_dir / "meta.json").read_text())
    counts = {k: v["records"] for k, v in meta["sources"].items()}
    tasks = {k: v["task"] for k, v in meta["sources"].items()}
    plan = mixture_counts(cfg, counts, tasks)
    seed = cfg.run.seed if seed is None else seed
    # A seeded shuffle is only reproducible if blocks arrive in the same order every time;
    # streaming execution otherwise hands them over as they finish (seen here: two runs with
    # one seed drew different samples).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    from ray.data.expressions import col

    from bioray.corpus.read import read_row_groups

    # Not read_parquet: its file-listing task asks a whole CPU, which a Tune trial may never get
    # while other trials train (seen here: a search waited forever on 0.9 free CPUs).
    where = file_task_options(cfg.run.storage, LIGHT_CPUS, node)  # the cache is the driver's when no filesystem is shared
    base = read_row_groups(sorted(str(p) for p in (cache_dir / "data").glob("*.parquet")),
                           columns=["source", "input_ids", "labels"], num_cpus=where.pop("num_cpus"),
                           ray_remote_args=where)
    parts = []
    for i, (name, n) in enumerate(sorted(plan.items())):
        ds = base.filter(expr=col("source") == name, num_cpus=LIGHT_CPUS)
        repeats = math.ceil(n / counts[name])
        if repeats > 1:
            ds = ds.union(*[ds] * (repeats - 1))
        parts.append(ds.random_shuffle(seed=seed + i, num_cpus=LIGHT_CPUS).limit(n))
    mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    mixed = mixed.random_shuffle(seed=seed + 1000, num_cpus=LIGHT_CPUS)
    log.info("mixture for this run: %s (%d records per epoch)", plan, sum(plan.values()))
    return mixed.map_batches(
        _pack_batch, fn_kwargs=dict(max_len=cfg.data.max_seq_len, packing=cfg.data.packing, seed=seed),
        batch_size=4096, batch_format="numpy", num_cpus=LIGHT_CPUS,
    ), plan


def _pack_batch(batch: dict, max_len: int, packing: bool, seed: int) -> dict:
    return pack_examples(batch["input_ids"], batch["labels"], max_len, packing, seed)


def pack_examples(input_ids: Iterable, labels: Iterable, max_len: int, packing: bool, seed: int = 0) -> dict:
    """Packs examples into rows with per-example ``position_ids`` (restarting at 0).

    First-fit decreasing fills rows to ~99% on short examples, where greedy in-order packing
    wastes about half an example per row. Rows are then shuffled (seeded) so that row order does
    not follow length.

    Returns:
        Columns ``input_ids``, ``labels``, ``position_ids`` (object arrays of int32 arrays).
    """
    examples = [(np.asarray(i, dtype=np.int32), np.asarray(l, dtype=np.int32)) for i, l in zip(input_ids, labels)]
    if not packing:
        bins = [[e] for e in examples]
    else:
        bins, room = [], []
        for e in sorted(examples, key=lambda e: -len(e[0])):
            n = len(e[0])
            for b, r in enumerate(room):
                if n <= r:
                    bins[b].append(e)
                    room[b] -= n
                    break
            else:
                bins.append([e])
                room.append(max_len - n)
        order = np.random.default_rng(seed + len(examples)).permutation(len(bins))
        bins = [bins[i] for i in order]
    ids = [np.concatenate([e[0] for e in b]) for b in bins]
    lab = [np.concatenate([e[1] for e in b]) for b in bins]
    pos = [np.concatenate([np.arange(len(e[0]), dtype=np.int32) for e in b]) for b in bins]
    as_obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # keep ragged rows 1-D
    return {"input_ids": as_obj(ids), "labels": as_obj(lab), "position_ids": as_obj(pos)}


def collate(rows: list[dict], pad_id: int, packing: bool, answer_logits: bool = False) -> dict:
    """Pads a micro-batch of rows into tensors the model takes.

    Packed rows get no attention mask: transformers builds the block-diagonal mask from
    ``position_ids`` restarting at 0 (``masking_utils.find_packed_sequence_indices``), which only
    works with ``use_cache=False``. Padding continues as its own 0.. sequence, after the real
    tokens, so causal attention never lets a real token see it.

    With ``answer_logits``, the model projects onto the vocabulary only the positions whose next
    token has a label (the answers): ``logits_to_keep`` as a boolean mask, and ``shift_labels``
    their targets in the same order. The loss and its gradients are the same; the prompt's logits,
    which the loss never reads, are not computed (the LM head is about a third of a tiny model's
    arithmetic; see docs/benchmarks.md).
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[k, :n] = torch.tensor(r["input_ids"])
        labels[k, :n] = torch.tensor(r["labels"])
        pos[k, :n] = torch.tensor(r["position_ids"])
        pos[k, n:] = torch.arange(width - n)
        mask[k, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}
    if not packing:
        batch["attention_mask"] = mask
    if answer_logits:
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts t+1
        keep = targets != IGNORE_INDEX
        batch["logits_to_keep"], batch["shift_labels"] = keep, targets[keep]
    return batch


def micro_batches(shard, micro_batch_size: int, pad_id: int, packing: bool,
                  skip: int = 0, answer_logits: bool = False) -> Iterator[tuple[dict, int]]:
    """Endless ``(micro-batch, real token count)`` pairs from a worker's shard, epoch after epoch.

    Every epoch reads the shard in the same order, so a micro-batch's place in the stream is its
    data position: ``skip`` passes over the first ``skip`` micro-batches uncollated (a resumed
    run's, already trained on), and the next one is where the interrupted run would have gone on.
    ``answer_logits``: see :func:`collate`.
    """
    while True:
        n = 0
        for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", drop_last=False):
            n += 1
            if skip:
                skip -= 1
                continue
            rows = [{k: batch[k][i] for k in ("input_ids", "labels", "position_ids")}
                    for i in range(len(batch["input_ids"]))]
            yield collate(rows, pad_id, packing, answer_logits), sum(len(r["input_ids"]) for r in rows)
        if n == 0:
            raise DataError("this worker's training shard is empty: the corpus has fewer packed rows than workers")
        skip %= n  # whole epochs already trained on need not be read again
