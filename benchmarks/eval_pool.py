"""Benchmark the evaluation actor pool: examples/s with 1 and 2 scorer actors on CPU.

The same checkpoint (the quickstart's best, or one trained now: see eval_decoding.py), the same
held-out records (all validation records of the quickstart's three sources) and free greedy
decoding at batch 32, one CPU (one torch thread) per actor; each pool size is timed on its second checkpoint pass (the first loads the
adapter into freshly started actors), in one run:

    python benchmarks/eval_pool.py --out runs/bench/eval_pool.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from eval_decoding import find_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--build-dir", default=str(ROOT / "runs" / "bench-eval-build"))
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from bioray.config import load
    from bioray.checkpoint import checkpoint_base
    from bioray.evaluate.pool import run_pool, start_pool, stop_pool
    from bioray.recipes import prepare

    ckpt = find_checkpoint(Path(args.build_dir))
    cfg = load(ckpt / "bioray.yaml", ["eval.max_examples=null", "eval.batch_size=32", "eval.decoding=free",
                                      "run.quiet=true"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    corpus = prepare(cfg)
    base = checkpoint_base(ckpt)
    result = {"checkpoint": str(ckpt), "batch_size": 32, "cpus": 2}
    for actors in (1, 2):
        raw = load(ckpt / "bioray.yaml", ["eval.max_examples=null", "eval.batch_size=32", "eval.decoding=free",
                                          f"eval.num_actors={actors}", "eval.cpus_per_actor=1.0",
                                          "run.quiet=true"])
        pool = start_pool(raw, base, corpus, f"bench-pool-{actors}")
        try:
            run_pool(pool, str(ckpt))  # warm-up: actors load the base and the adapter
            start = time.perf_counter()
            scores, predictions = run_pool(pool, str(ckpt))
            seconds = time.perf_counter() - start
        finally:
            stop_pool(pool)
        result[f"examples_{actors}_actor"] = len(predictions)
        result[f"examples_per_s_{actors}_actor"] = len(predictions) / seconds
    result["speedup_2_vs_1"] = result["examples_per_s_2_actor"] / result["examples_per_s_1_actor"]
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
