"""Does the mixture search matter? Uniform mixture vs searched mixture, each over two seeds.

    BIORAY_DATA=../shared/data python benchmarks/mixture_search.py --out mixture.json
    python benchmarks/mixture_search.py --small --out small.json     # the quickstart, minutes (CPU test)

1. The uniform mixture (every source weight 1), trained with each seed: the spread of their mean
   F1 is the noise floor.
2. A Ray Tune search over the mixture weights only (``jobs/tune.py``: ASHA, every trial the same
   ``train.max_steps``), learning rate and LoRA rank held at the config's.
3. The best trial's mixture retrained with each seed.

The JSON holds every run's per-source devel score, the searched weights, the seed spread and the
gain: searched mean minus uniform mean, averaged over seeds. Each run is a job of its own
(``jobs/finetune.py``, ``jobs/tune.py``), exactly as a user would run it, so nothing here differs
from what the CLI does; all share one tokenised cache and, per seed, one tiny base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = [  # the quickstart, cut to what a CPU test affords: the pieces, not the finding
    "model.tiny.pretrain_steps=40", "train.max_steps=24", "train.checkpoint_every=12", "train.report_every=12",
    "eval.max_examples=16", "tune.num_samples=2", "tune.grace_steps=12",
]


def mean_score(scores: dict, metric: str = "f1") -> float:
    """The mean over sources of one metric (each source's primary one for NER: entity F1)."""
    return statistics.fmean(m[metric] for m in scores.values())


def seed_spread(means: list[float]) -> float:
    """How far one setting's runs lie apart across seeds (max - min of their mean scores)."""
    return max(means) - min(means) if means else 0.0


def gain(uniform: list[float], searched: list[float]) -> float:
    """Searched minus uniform mean score, each averaged over its seeds."""
    return statistics.fmean(searched) - statistics.fmean(uniform)


def summary(runs: list[dict], weights: dict[str, float]) -> dict:
    """The benchmark's verdict from its runs (``{"mixture": uniform|searched, "mean": ...}`` each)."""
    uni = [r["mean"] for r in runs if r["mixture"] == "uniform"]
    got = [r["mean"] for r in runs if r["mixture"] == "searched"]
    spread = max(seed_spread(uni), seed_spread(got))
    g = gain(uni, got)
    return {"searched_weights": weights, "uniform_mean": statistics.fmean(uni), "searched_mean": statistics.fmean(got),
            "seed_spread": spread, "seed_spread_uniform": seed_spread(uni), "seed_spread_searched": seed_spread(got),
            "gain": g, "gain_beats_noise": g >= 0.01 and g > spread}


def _job(script: str, sets: list[str], config: str | None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "jobs" / script)] + (["--config", config] if config else [])
    args += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"mixture_search: {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _run(config: str | None, sets: list[str], run_dir: Path, seed: int, mixture: str, weights: dict) -> dict:
    start = time.time()
    w = "{" + ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}"
    _job("finetune.py", [*sets, f"run.dir={run_dir}", f"run.seed={seed}", f"mixture.weights={w}"], config)
    result = json.loads((run_dir / "result.json").read_text())
    scores = result["eval"]
    return {"mixture": mixture, "seed": seed, "weights": weights, "run_dir": str(run_dir),
            "eval": {s: {k: m[k] for k in ("f1", "parse_rate", "n") if k in m} for s, m in scores.items()},
            "mean": mean_score(scores), "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--config", default=None, help="base config (default: configs/ner-real.yaml; --small: quickstart)")
    p.add_argument("--small", action="store_true", help="the quickstart cut to minutes: checks the pieces, not the gain")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--trials", type=int, default=None, help="tune.num_samples (default: the config's)")
    p.add_argument("--work", default="runs/mixture-search", help="folder for the runs")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    a = p.parse_args(argv)
    config = a.config or (None if a.small else "configs/ner-real.yaml")
    sets = (SMALL if a.small else []) + list(a.set)
    work = Path(a.work).resolve()
    names = [s["name"] for s in yaml.safe_load((ROOT / (config or "configs/quickstart.yaml")).read_text())
             ["corpus"]["sources"]]
    started = time.time()
    runs = [_run(config, sets, work / f"uniform-seed{s}", s, "uniform", {n: 1.0 for n in names}) for s in a.seeds]
    search_dir = work / "search"
    tune_sets = [*sets, f"run.dir={search_dir}", f"run.seed={a.seeds[0]}", "tune.lr=null", "tune.rank=null",
                 "tune.mixture=true", "tune.scheduler=asha"] + ([f"tune.num_samples={a.trials}"] if a.trials else [])
    _job("tune.py", tune_sets, config)
    best = yaml.safe_load((search_dir / "tune" / "best.yaml").read_text())
    weights = {n: float(best["mixture"]["weights"].get(n, 1.0)) for n in names}
    runs += [_run(config, sets, work / f"searched-seed{s}", s, "searched", weights) for s in a.seeds]
    trials = json.loads((search_dir / "tune" / "result.json").read_text())
    out = {"config": config or "configs/quickstart.yaml", "small": a.small, "sets": sets, "seeds": a.seeds,
           "runs": runs, "search": {"dir": str(search_dir / "tune"), "trials": trials.get("trials"),
                                    "best": trials.get("best")},
           **summary(runs, weights), "wall_s": round(time.time() - started, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("uniform_mean", "searched_mean", "gain", "seed_spread", "searched_weights",
                                          "wall_s")}, indent=2))
    return out


if __name__ == "__main__":
    main()
