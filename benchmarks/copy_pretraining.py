"""Experiment: can the tiny base learn to copy, and what does that need? (issue 21, item 3)

An NER answer is the input's words again, one ``word : TAG`` line each, so a base fine-tuned with
free decoding must copy. This script pretrains the quickstart's tiny base with bioray's own
``_pretrain`` on the quickstart's corpus, for each pretraining text and each
``model.tiny.pretrain_packing``, and measures the copy: the loss per token of validation sentences
written twice (``x\\nx``), first copy against second. A base that copies brings the second near 0.

    python benchmarks/copy_pretraining.py --out runs/copy.json

Pretraining texts: ``twice`` (each training input written twice, bioray's ``pretrain_on: twice``)
and ``runs`` (random runs of the corpus's words written twice: copying is the only way to predict
the second half). Results and what they mean: docs/real-data.md, "What made the difference".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def random_runs(inputs: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` runs of 4-14 words drawn from the inputs' words, each written twice."""
    rng, words = random.Random(seed), [w for t in inputs for w in t.split()]
    runs = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(n)]
    return [f"{r}\n{r}" for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="runs/copy-pretraining")
    ap.add_argument("--texts", nargs="+", default=["twice", "runs"], choices=["twice", "runs", "inputs"])
    ap.add_argument("--packings", nargs="+", default=["concatenated", "isolated"])
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps (the quickstart's: 300)")
    args = ap.parse_args()

    import ray
    import torch

    from answer_free_quickstart import copy_nll
    from bioray import model as M
    from bioray.config import load
    from bioray.corpus import read_manifest, read_records
    from bioray.recipes import prepare

    work = Path(args.work).resolve()
    cfg = load(ROOT / "configs" / "quickstart.yaml", [f"run.dir={work / 'run'}", f"data.cache_dir={work / 'cache'}",
                                                     "run.quiet=true", f"model.tiny.pretrain_steps={args.steps}"])
    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    corpus_dir = prepare(cfg)
    ray.shutdown()
    manifest = read_manifest(corpus_dir)
    inputs = M._corpus_texts(cfg, corpus_dir, manifest, "inputs")
    validation = [r["input"] for r in read_records(corpus_dir, cfg.corpus.sources[0].name, "validation")][:40]
    tokenizer = M._train_tokenizer(M._corpus_texts(cfg, corpus_dir, manifest, "prompts"), cfg.model.tiny.vocab_size,
                                   cfg.model.tiny.pre_tokenizer)
    rows = []
    for what in args.texts:
        texts = random_runs(inputs, len(inputs)) if what == "runs" else M._corpus_texts(cfg, corpus_dir, manifest, what)
        for packing in args.packings:
            cfg.model.tiny.pretrain_packing = packing
            model = M._init_tiny(cfg, tokenizer)
            start = time.time()
            M._pretrain(model, tokenizer, texts, cfg)
            seconds = time.time() - start
            base = work / f"base-{what}-{packing}"
            model.save_pretrained(base)
            tokenizer.save_pretrained(base)
            rows.append({"texts": what, "packing": packing, "steps": args.steps, "pretrain_seconds": round(seconds, 1),
                         "copy_loss": {k: round(v, 3) for k, v in copy_nll(base, validation).items()}})
            print(json.dumps(rows[-1]), flush=True)
    t = cfg.model.tiny
    result = {"what": "copy loss of the quickstart's tiny base by pretraining text and packing "
                      "(benchmarks/copy_pretraining.py)",
              "base": {"hidden_size": t.hidden_size, "num_layers": t.num_layers, "vocab_size": t.vocab_size,
                       "pretrain_lr": t.pretrain_lr, "pretrain_batch_size": t.pretrain_batch_size},
              "validation_sentences": len(validation), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
