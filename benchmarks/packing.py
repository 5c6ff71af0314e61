"""Benchmark packing: the share of real (non-pad) tokens in training micro-batches.

Same records as benchmarks/tokenise.py (the real NER data of ../shared/data/ner, ~24.6k
records, paper template, an 8k BPE trained on them), max_seq_len 512, micro-batches of 8 rows, as
the training workers see them (``bioray.data.training_dataset`` then ``collate``), in one run:

    python benchmarks/packing.py --out runs/bench/packing.json

``non_pad_fraction_packed``: packing on (first-fit decreasing into 512-token rows);
``non_pad_fraction_padded``: packing off (one example per row, padded to the longest in its batch,
in the mixed order, as a length-unaware loader would).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenise import DATA, _config, _tokenizer  # noqa: E402  (same records, same tokenizer)


def _fraction(cfg, cache, micro: int) -> tuple[float, int]:
    from bioray.data import collate, training_dataset

    ds, _ = training_dataset(cfg, cache)
    real = total = 0
    for batch in ds.iter_batches(batch_size=micro, batch_format="numpy"):
        rows = [{k: batch[k][i] for k in ("input_ids", "labels", "position_ids")} for i in range(len(batch["input_ids"]))]
        t = collate(rows, pad_id=0, packing=cfg.data.packing)
        real += sum(len(r["input_ids"]) for r in rows)
        total += t["input_ids"].numel()
    return real / total, real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real data not found at {DATA}")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from bioray.config import from_dict, to_dict
    from bioray.corpus import build_corpus
    from bioray.data import tokenise

    work = Path(tempfile.mkdtemp(prefix="bioray-bench-pack-"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = _config(work, 1)
        corpus_dir = build_corpus(cfg)
        tok_path = _tokenizer(cfg, corpus_dir, work / "tok")
        raw = to_dict(cfg)
        raw["data"]["max_seq_len"] = args.max_seq_len
        cfg = from_dict(raw)
        cache, meta = tokenise(cfg, corpus_dir, tok_path)
        result = {"records": meta["records"], "max_seq_len": args.max_seq_len, "micro_batch": args.micro_batch}
        for packing in (True, False):
            raw["data"]["packing"] = packing
            frac, tokens = _fraction(from_dict(raw), cache, args.micro_batch)
            result["non_pad_fraction_packed" if packing else "non_pad_fraction_padded"] = frac
            result["real_tokens_packed" if packing else "real_tokens_padded"] = tokens
        assert result["real_tokens_packed"] == result["real_tokens_padded"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
