"""Benchmark tokenisation: bioray's Ray Data pipeline against datasets.map and the bare tokenizer.

Same records (the real NER data of ../shared/data/ner, train and devel of all three sources,
~24.6k records), same tokenizer (a byte-level BPE trained on them), same template and the same
work per record (render the prompt, tokenise prompt and answer apart, build labels with -100 on
the prompt), in one run:

    python benchmarks/tokenise.py --out runs/bench/tokenise.json

- ``bioray``: ``bioray.data.tokenise`` on a cold cache: corpus row groups -> one fused Ray Data
  task per block (read, tokenise, write) -> cache Parquet, with the cluster started beforehand (as
  in a job, where the corpus build has just run on it).
- ``datasets_map``: ``datasets.Dataset.from_parquet(corpus).map(num_proc=2, batched=True)`` with
  the same ``Tokenise`` function, then ``to_parquet``: the pipelines compared on equal work.
- ``datasets_map_hf_call``: the same, with the function users usually write: the tokenizer's
  ``__call__`` on prompts and answers, labels built in Python (bioray's earlier UDF).
- ``raw``: the tokenizer called directly in batches of 2,048 on prompts and answers (no labels, no
  I/O).
Tokens counted are prompt + answer + BOS/EOS per record, identical for all three.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ner"
FOLDERS = {"ncbi_disease": ("NCBI-disease", "disease"), "bc5cdr_chem": ("BC5CDR-chem", "chemical"),
           "bc5cdr_disease": ("BC5CDR-disease", "disease")}


def _config(work: Path, cpus: float, parts: tuple[str, ...] = ("train", "devel")):
    from bioray.config import from_dict

    sources = []
    for name, (folder, entity) in FOLDERS.items():
        for part in parts:
            # Devel files enter as the train split of their own source: tokenise() reads train.
            sources.append({"name": f"{name}_{part}", "format": "iob", "task": "ner", "entity": entity,
                            "files": {"train": str(DATA / folder / f"{part}.tsv")}})
    return from_dict({"run": {"dir": str(work / "run"), "quiet": True}, "corpus": {"sources": sources},
                      "data": {"max_seq_len": 4096, "cache_dir": str(work / "cache"), "tokenise_cpus": cpus}})


def _tokenizer(cfg, corpus_dir: Path, out: Path, vocab_size: int = 8192) -> str:
    from bioray.model import _corpus_texts, _train_tokenizer
    from bioray.corpus import read_manifest

    tok = _train_tokenizer(_corpus_texts(cfg, corpus_dir, read_manifest(corpus_dir), "prompts"), vocab_size)
    tok.save_pretrained(out)
    return str(out)


def _datasets_map(cfg, corpus_dir: Path, fn, out: Path) -> tuple[float, int]:
    import datasets

    datasets.disable_progress_bars()
    files = sorted(str(p) for p in corpus_dir.glob("*.parquet"))
    start = time.perf_counter()
    ds = datasets.Dataset.from_parquet(files)
    ds = ds.filter(lambda b: [s == "train" for s in b["split"]], batched=True, batch_size=2048, num_proc=2)
    mapped = ds.map(lambda b: fn(pa.table({k: list(v) for k, v in b.items()})).to_pydict(), batched=True, batch_size=2048, num_proc=2,
                    remove_columns=ds.column_names)
    mapped.to_parquet(str(out / "datasets.parquet"))
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in mapped["input_ids"])
    (out / "datasets.parquet").unlink()
    return seconds, tokens


class _HFCall:
    """The per-batch function as users usually write it: tokenizer __call__, labels in Python."""

    def __init__(self, tokenizer_path: str, template: str):
        from transformers import AutoTokenizer

        from bioray.corpus import render_prompt

        self.tok, self.template, self.render = AutoTokenizer.from_pretrained(tokenizer_path), template, render_prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pydict()
        prompts = [self.render(self.template, i, x) for i, x in zip(rows["instruction"], rows["input"])]
        p_ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        a_ids = self.tok(rows["output"], add_special_tokens=False)["input_ids"]
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        ids = [[bos, *p, *a, eos] for p, a in zip(p_ids, a_ids)]
        labels = [[-100] * (len(p) + 1) + [*a, eos] for p, a in zip(p_ids, a_ids)]
        return pa.table({"id": rows["id"], "input_ids": ids, "labels": labels})


def _raw(cfg, corpus_dir: Path, tok_path: str) -> tuple[float, int]:
    from transformers import AutoTokenizer

    from bioray.corpus import read_records, read_manifest, render_prompt

    manifest = read_manifest(corpus_dir)
    records = [r for name in manifest["sources"] for r in read_records(corpus_dir, name, "train")]
    prompts = [render_prompt(cfg.corpus.template, r["instruction"], r["input"]) for r in records]
    answers = [r["output"] for r in records]
    tok = AutoTokenizer.from_pretrained(tok_path)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), 2048):
        p = tok(prompts[i:i + 2048], add_special_tokens=False)["input_ids"]
        a = tok(answers[i:i + 2048], add_special_tokens=False)["input_ids"]
        tokens += sum(len(x) + len(y) + 2 for x, y in zip(p, a))
    return time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cpus", type=float, default=1.0, help="data.tokenise_cpus (CPUs per tokenising task)")
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real data not found at {DATA}")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from bioray.corpus import PromptFormat, build_corpus
    from bioray.data import Tokenise, probe_texts, tokenise
    from bioray.model import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bioray-bench-tok-"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = _config(work, args.cpus)
        corpus_dir = build_corpus(cfg)
        tok_path = _tokenizer(cfg, corpus_dir, work / "tok")
        start = time.perf_counter()
        cache, meta = tokenise(cfg, corpus_dir, tok_path)
        bioray_s = time.perf_counter() - start
        ray.shutdown()
        tok = load_tokenizer(tok_path, cfg)
        same = Tokenise(tok, cfg.corpus.template, cfg.data.max_seq_len, cfg.data.overlong,
                        probe=probe_texts(corpus_dir, PromptFormat(cfg.corpus.template, tok)))
        ds_s, ds_tokens = _datasets_map(cfg, corpus_dir, same, work)
        hf_s, hf_tokens = _datasets_map(cfg, corpus_dir, _HFCall(tok_path, cfg.corpus.template), work)
        raw_s, raw_tokens = _raw(cfg, corpus_dir, tok_path)
        assert ds_tokens == hf_tokens == meta["tokens"] == raw_tokens, (ds_tokens, hf_tokens, meta["tokens"], raw_tokens)
        result = {
            "records": meta["records"], "tokens": meta["tokens"], "tokenise_cpus": args.cpus,
            "bioray_uses_rust_backend": same.uses_backend,
            "bioray_seconds": round(bioray_s, 3), "datasets_map_seconds": round(ds_s, 3),
            "datasets_map_hf_call_seconds": round(hf_s, 3), "raw_seconds": round(raw_s, 3),
            "bioray_tokens_per_s": meta["tokens"] / bioray_s,
            "datasets_map_tokens_per_s": ds_tokens / ds_s,
            "datasets_map_hf_call_tokens_per_s": hf_tokens / hf_s,
            "raw_tokens_per_s": raw_tokens / raw_s,
        }
        result["bioray_vs_datasets_map"] = result["bioray_tokens_per_s"] / result["datasets_map_tokens_per_s"]
        result["bioray_vs_datasets_map_hf_call"] = (result["bioray_tokens_per_s"]
                                                    / result["datasets_map_hf_call_tokens_per_s"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
