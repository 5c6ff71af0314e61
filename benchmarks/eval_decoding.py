"""Benchmark scoring: free greedy generation against constrained decoding, on the same model and records.

For every source of the checkpoint's corpus: examples/s, parse rate and the source's metrics of
each decoding, with the same model, records and batch size, written as JSON:

    python benchmarks/eval_decoding.py --out runs/bench/eval_decoding.json

The checkpoint defaults to the quickstart's best (``runs/quickstart/result.json``); where there is
none, the benchmark first trains one with ``jobs/finetune.py`` (20 steps, into ``--build-dir``).
Each decoding runs ``--repeats`` times per source, alternating, and the fastest run counts: the
machine may be shared, and the fastest run is the one least disturbed by other processes. The
process's CPU time is recorded too (``*_per_cpu_s``): with one thread it measures the work done,
which other processes on a busy machine barely change, while wall-clock time can double.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from bioray import config  # noqa: E402
from bioray.corpus import read_manifest  # noqa: E402
from bioray.checkpoint import checkpoint_base  # noqa: E402
from bioray.evaluate.generate import Generator  # noqa: E402
from bioray.evaluate.pool import answer_specs, eval_items, score_predictions, source_decoding  # noqa: E402
from bioray.recipes import prepare  # noqa: E402

log = logging.getLogger("bioray")


def find_checkpoint(build_dir: Path) -> Path:
    """The quickstart's best checkpoint, or one trained now (20 steps) when there is none."""
    for result in (ROOT / "runs/quickstart/result.json", build_dir / "result.json"):
        if result.is_file():
            best = Path(json.loads(result.read_text())["best_checkpoint"])
            if best.is_dir():
                return best
    log.info("no checkpoint found; training one (20 steps) into %s", build_dir)
    subprocess.run([sys.executable, str(ROOT / "jobs/finetune.py"), "--set", "train.max_steps=20",
                    "--set", f"run.dir={build_dir}"], check=True, cwd=ROOT)
    return Path(json.loads((build_dir / "result.json").read_text())["best_checkpoint"])


def answer_caps(tokenizer, items: list[dict], cap: int | None) -> list[int]:
    """Free decoding's length cap per record, as the scorer actors set it."""
    lengths = [len(x) for x in tokenizer([i["output"] for i in items], add_special_tokens=False)["input_ids"]]
    return [cap if cap else int(n * 1.5) + 8 for n in lengths]


def timed(fn) -> tuple[list[str], float, float]:
    """The result of ``fn()``, its wall-clock seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_source(gen: Generator, cfg, items: list[dict], specs: list, repeats: int) -> dict:
    """Answers (last run), fastest wall-clock and least CPU seconds of ``repeats`` runs of each decoding."""
    prompts = gen.prompts(items)
    caps = answer_caps(gen.tokenizer, items, cfg.eval.max_new_tokens)
    decode = {"free": lambda: gen.generate(prompts, caps, cfg.eval.batch_size, cfg.eval.num_beams),
              "constrained": lambda: gen.constrained(prompts, specs, caps, cfg.eval.batch_size, cfg.eval.num_beams)}
    runs: dict[str, list] = {name: [] for name in decode}
    for _ in range(repeats):
        for name, fn in decode.items():
            runs[name].append(timed(fn))
    return {name: (r[-1][0], min(x[1] for x in r), min(x[2] for x in r)) for name, r in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the quickstart's best)")
    p.add_argument("--build-dir", default="/tmp/bench-run", help="run folder for a checkpoint trained here")
    p.add_argument("--batch-size", type=int, default=32, help="examples per batch, both decodings")
    p.add_argument("--max-examples", type=int, default=64, help="records per source")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the quickstart's scorer actor has 0.5 CPU: 1 thread)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each decoding per source; the fastest counts")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.chdir(ROOT)  # checkpoint configs name their corpus files relative to the project
    torch.set_num_threads(args.threads)

    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else find_checkpoint(Path(args.build_dir))
    cfg = config.load(ckpt / "bioray.yaml", [f"eval.batch_size={args.batch_size}",
                                             f"eval.max_examples={args.max_examples}", "run.quiet=true"])
    corpus = prepare(cfg)
    manifest = read_manifest(corpus)
    items = eval_items(cfg, corpus)
    gen = Generator(checkpoint_base(ckpt), cfg)
    gen.use(ckpt)
    specs = answer_specs(cfg, manifest, items)
    gen.generate(gen.prompts(items[:1]), [4], 1)  # warm-up: first-call allocations are not decoding

    sources, totals = {}, {"free": [0.0, 0, 0.0, 0.0], "constrained": [0.0, 0, 0.0, 0.0]}  # s, n, parsed, cpu s
    methods = source_decoding(config.from_dict({**config.to_dict(cfg), "eval": {**config.to_dict(cfg)["eval"],
                                                                                 "decoding": "constrained"}}),
                              manifest)
    for name in dict.fromkeys(i["source"] for i in items):
        ks = [k for k, i in enumerate(items) if i["source"] == name]
        group = [items[k] for k in ks]
        result = bench_source(gen, cfg, group, [specs[k] for k in ks], args.repeats)
        entry = {"task": group[0]["task"], "n": len(group), "constrained_method": methods[name]}
        for decoding, (answers, seconds, cpu) in result.items():
            scores = score_predictions(cfg, manifest, group, {i["id"]: a for i, a in zip(group, answers)})[name]
            entry[decoding] = {"seconds": round(seconds, 3), "examples_per_s": round(len(group) / seconds, 2),
                               "cpu_seconds": round(cpu, 3), "examples_per_cpu_s": round(len(group) / cpu, 2),
                               **{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}}
            totals[decoding][0] += seconds
            totals[decoding][1] += len(group)
            totals[decoding][2] += scores["parse_rate"] * len(group)
            totals[decoding][3] += cpu
        entry["speedup"] = round(entry["free"]["seconds"] / entry["constrained"]["seconds"], 2)
        entry["speedup_cpu"] = round(entry["free"]["cpu_seconds"] / entry["constrained"]["cpu_seconds"], 2)
        sources[name] = entry
        log.info("%s: free %.1f ex/s (parse %.3f), constrained %.1f ex/s (parse %.3f), %.2fx (%.2fx in CPU time)",
                 name, entry["free"]["examples_per_s"], entry["free"]["parse_rate"],
                 entry["constrained"]["examples_per_s"], entry["constrained"]["parse_rate"], entry["speedup"],
                 entry["speedup_cpu"])

    out = {
        "free_examples_per_s": round(totals["free"][1] / totals["free"][0], 2),
        "constrained_examples_per_s": round(totals["constrained"][1] / totals["constrained"][0], 2),
        "free_parse_rate": round(totals["free"][2] / totals["free"][1], 4),
        "constrained_parse_rate": round(totals["constrained"][2] / totals["constrained"][1], 4),
        "speedup": round(totals["free"][0] / totals["constrained"][0], 2),
        "free_examples_per_cpu_s": round(totals["free"][1] / totals["free"][3], 2),
        "constrained_examples_per_cpu_s": round(totals["constrained"][1] / totals["constrained"][3], 2),
        "sources": sources,
        "setup": {"checkpoint": str(ckpt), "batch_size": args.batch_size, "max_examples": args.max_examples,
                  "threads": args.threads, "repeats": args.repeats, "device": "cpu",
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                  "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "sources"}, indent=2))


if __name__ == "__main__":
    main()
