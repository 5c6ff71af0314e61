"""Does the mixture search matter? Uniform mixture vs searched mixture, each over two seeds.

    BIORAY_DATA=../shared/data python benchmarks/mixture_search.py --out mixture.json
    python benchmarks/mixture_search.py --small --out small.json     # the quickstart, minutes (CPU test)

1. The uniform mixture (every source weight 1), trained with each seed: the spread of their mean
   F1 is the noise floor.
2. A Ray Tune search over the mixture weights only (``jobs/tune.py``: ASHA, every trial the same
   ``train.max_steps``), learning rate and LoRA rank held at the config's; trials scored at several
   checkpoints on a slice of the devel split (:func:`search_sets`) so ASHA can stop the weak ones.
3. The best trial's mixture retrained with each seed.

The JSON holds every run's per-source devel score, the searched weights, the seed spread and the
gain: searched mean minus uniform mean, averaged over seeds. ``<work>/report.md`` says the same for a
reader (:func:`report_markdown`): the per-source table beside the paper's numbers, the mixtures, the
verdict, the search plot (``<work>/search.png``) and what the run cost. Each run is a job of its own
(``jobs/finetune.py``, ``jobs/tune.py``), exactly as a user would run it, so nothing here differs
from what the CLI does; all share one tokenised cache and, per seed, one tiny base.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bioray.config import load  # noqa: E402
from bioray.report import _fmt_ref, _pct  # noqa: E402

SMALL = [  # the quickstart, cut to what a CPU test affords: the pieces, not the finding
    "model.tiny.pretrain_steps=40", "train.max_steps=24", "train.checkpoint_every=12", "train.report_every=12",
    "eval.max_examples=16", "tune.num_samples=2", "tune.grace_steps=12",
]
MIN_GAIN = 0.01  # a gain below one point of F1 is no finding, whatever the spread
MIXTURES = ("uniform", "searched")


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
    by = _by_mixture(runs)
    uni, got = ([r["mean"] for r in by[m]] for m in MIXTURES)
    spread = max(seed_spread(uni), seed_spread(got))
    g = gain(uni, got)
    return {"searched_weights": weights, "uniform_mean": statistics.fmean(uni), "searched_mean": statistics.fmean(got),
            "seed_spread": spread, "seed_spread_uniform": seed_spread(uni), "seed_spread_searched": seed_spread(got),
            "gain": g, "gain_beats_noise": g >= MIN_GAIN and g > spread}


# ---------------------------------------------------------------------------- report.md


def write_report(work: Path, out: dict, config: dict) -> Path:
    """``<work>/report.md``, with the search's plot copied beside it as ``search.png``; names both in ``out``."""
    plot = Path(out["search"]["dir"]) / "search.png"
    if plot.exists():
        shutil.copyfile(plot, work / "search.png")
    out["search"]["plot"] = "search.png" if plot.exists() else None
    out["report"] = str(work / "report.md")
    (work / "report.md").write_text(report_markdown(out, config))
    return work / "report.md"


def report_markdown(out: dict, config: dict) -> str:
    """``<work>/report.md``: both mixtures' scores per source beside the paper's, the mixtures, the verdict.

    Args:
        out: What :func:`main` writes to ``--out``: the runs, :func:`summary`'s numbers, the search
            (its ``result.json`` counts and ``plot``), ``wall_s`` and ``command``.
        config: The benchmark's config as read from its YAML: the sources and each one's ``reference``.
    """
    lines = [f"# Mixture search: uniform vs searched mixture (`{out.get('config')}`)", ""]
    if out.get("small"):
        lines += ["`--small`: the quickstart cut to minutes; it checks the pieces, not the finding.", ""]
    lines += _score_section(out, config) + _mixture_section(out) + _verdict_section(out)
    if (out.get("search") or {}).get("plot"):
        lines += ["## The search", "",
                  "Task score of each trial against each source's weight (one panel per source; orange: stopped "
                  "early by ASHA, scored at its latest checkpoint).", "",
                  f"![task score against each source's weight, one dot per trial]({out['search']['plot']})", ""]
    lines += _cost_section(out)
    return "\n".join(lines)


def _by_mixture(runs: list[dict]) -> dict[str, list[dict]]:
    """Each mixture's runs, by seed."""
    return {m: sorted((r for r in runs if r["mixture"] == m), key=lambda r: r["seed"]) for m in MIXTURES}


def _score_section(out: dict, config: dict) -> list[str]:
    sources = {s["name"]: s for s in config["corpus"]["sources"]}
    names = list(dict.fromkeys([n for n in sources if any(n in r["eval"] for r in out["runs"])]
                               + [n for r in out["runs"] for n in r["eval"]]))
    refs = {n: {k: v for k, v in (sources.get(n, {}).get("reference") or {}).items() if k != "metric"}
            for n in names}
    ref_cols = list(dict.fromkeys(k for n in names for k in refs[n]))
    runs = _by_mixture(out["runs"])
    split = next((r["split"] for r in out["runs"] if r.get("split")), "validation")
    metric = "Entity F1" if all(sources.get(n, {}).get("task") == "ner" for n in names) else "F1"
    head = ["source"] + [f"{m} {c}" for m in MIXTURES for c in [*(f"seed {r['seed']}" for r in runs[m]), "mean"]]
    lines = ["## Scores", "",
             f"{metric} of each source on the `{split}` split, in percent: each seed's run and the mean over seeds."
             + (" Reference columns are each source's `reference` in the config (Rohanian et al. 2024's "
                "Llama-2 7B/13B and the encoder baseline, as published)." if ref_cols else ""), "",
             "| " + " | ".join(head + ref_cols) + " |", "|" + "---|" * (len(head) + len(ref_cols))]
    for name in names:
        cells = [name]
        for m in MIXTURES:
            f1s = [r["eval"].get(name, {}).get("f1") for r in runs[m]]
            seen = [v for v in f1s if v is not None]
            cells += [_pct(v) for v in f1s] + [_pct(statistics.fmean(seen) if seen else None)]
        lines.append("| " + " | ".join(cells + [_fmt_ref(refs[name].get(c)) for c in ref_cols]) + " |")
    cells = ["mean"]
    for m in MIXTURES:
        cells += [_pct(r["mean"]) for r in runs[m]] + [_pct(out[f"{m}_mean"])]
    lines.append("| " + " | ".join(cells + [_ref_mean([refs[n].get(c) for n in names]) for c in ref_cols]) + " |")
    return lines + [""]


def _ref_mean(values: list) -> str:
    """One reference column's mean over the sources ('' unless every source has a score)."""
    scores = [v.get("score") if isinstance(v, dict) else v for v in values]
    if not scores or not all(isinstance(s, (int, float)) for s in scores):
        return ""
    mean = f"{statistics.fmean(scores):.2f}"
    names = {v.get("name") for v in values if isinstance(v, dict)}
    return _fmt_ref({"name": names.pop(), "score": mean} if len(names) == 1 and all(isinstance(v, dict) for v in values)
                    else mean)


def _mixture_section(out: dict) -> list[str]:
    runs = _by_mixture(out["runs"])
    weights = {"uniform": runs["uniform"][0]["weights"] if runs["uniform"] else {},
               "searched": out["searched_weights"]}
    names = list(dict.fromkeys([*weights["uniform"], *weights["searched"]]))
    planned = [r for m in MIXTURES for r in runs[m] if r.get("records_per_epoch")]
    head = ["source", "uniform weight (share)", "searched weight (share)",
            *(f"{r['mixture']} seed {r['seed']}: records/epoch" for r in planned)]
    lines = ["## The mixtures", "",
             "A weight is relative: a source's share of an epoch is its weight over the sum of the weights "
             "(the searched ones are a point on the simplex, the uniform ones are all 1)."
             + (" Records per epoch are each run's own (`mixture` in its `result.json`)." if planned else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for m in MIXTURES:
            w, total = weights[m].get(name), sum(weights[m].values())
            cells.append("" if w is None else f"{w:g} ({100 * w / total:.1f}%)" if total else f"{w:g}")
        cells += [str(r["records_per_epoch"].get(name, "")) for r in planned]
        lines.append("| " + " | ".join(cells) + " |")
    if planned:
        lines.append("| total | | | " + " | ".join(str(sum(r["records_per_epoch"].values())) for r in planned) + " |")
    best = (out.get("search") or {}).get("best")
    if best:
        lines += ["", f"The searched weights are the best trial's, `{best.get('trial')}` ({best.get('state')}, "
                      f"task score {_pct(best.get('score'))} after {best.get('steps')} steps, seed "
                      f"{out['seeds'][0] if out.get('seeds') else '?'}), retrained with every seed."]
    return lines + [""]


def _verdict_section(out: dict) -> list[str]:
    g, spread = out["gain"], out["seed_spread"]
    if out["gain_beats_noise"]:
        verdict = (f"**yes**: the gain ({_pts(g)}) is at least {_pct(MIN_GAIN)} points and larger than the seed "
                   f"spread ({_pct(spread)}): the searched mixture beats the uniform one at these settings.")
    else:
        why = [f"below {_pct(MIN_GAIN)} points"] if g < MIN_GAIN else []
        why += [f"inside the seed spread ({_pct(spread)})"] if g <= spread else []
        verdict = f"**no**: the gain ({_pts(g)}) is {' and '.join(why)}: not a finding."
    return ["## Is the gain more than noise?", "",
            "Points of the mean F1 over sources, in percent (the numbers of `summary()` in the JSON, times 100).", "",
            f"- Seed spread (max - min of one setting's per-seed means): uniform {_pct(out['seed_spread_uniform'])}, "
            f"searched {_pct(out['seed_spread_searched'])}; the larger, {_pct(spread)}, is the noise floor.",
            f"- Gain (searched mean - uniform mean, each over seeds): {_pts(g)} "
            f"({_pct(out['uniform_mean'])} -> {_pct(out['searched_mean'])}).",
            f"- Verdict (`gain_beats_noise`: gain >= {_pct(MIN_GAIN)} points and larger than the spread): {verdict}",
            ""]


def _pts(v: float) -> str:
    return f"{100 * v:+.2f} points"


def _cost_section(out: dict) -> list[str]:
    search = out.get("search") or {}
    wall = out.get("wall_s")
    runs = _by_mixture(out["runs"])
    lines = ["## The run", "", f"`{out.get('command', 'python benchmarks/mixture_search.py')}`", ""]
    if wall is not None:
        lines.append(f"- Wall time: {wall:,.0f} s ({wall / 3600:.1f} h) for every run and the search; per run: "
                     + ", ".join(f"{r['mixture']} seed {r['seed']} {r['seconds']:,.0f} s"
                                 for m in MIXTURES for r in runs[m] if r.get("seconds") is not None)
                     + ".")
    if search.get("trials") is not None:
        lines.append(f"- Search: {search['trials']} trials, {search.get('completed')} completed, "
                     f"{search.get('stopped_early')} stopped early by ASHA"
                     + (f", {search['errors']} failed" if search.get("errors") else "")
                     + (f"; outputs in `{search['dir']}`" if search.get("dir") else "") + ".")
    if out.get("sets"):
        lines.append("- Every run's `--set`: " + ", ".join(f"`{s}`" for s in out["sets"]) + ".")
    return lines + [""]


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
            "mean": mean_score(scores), "split": result.get("split"), "records_per_epoch": result.get("mixture"),
            "seconds": round(time.time() - start, 1)}


def _progress(path: str, head: dict, runs: list[dict], started: float) -> None:
    """``--out`` after each stage, marked ``"complete": false``: a benchmark cut short keeps what it measured."""
    _write_json(path, {**head, "runs": runs, "wall_s": round(time.time() - started, 1), "complete": False})


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def search_sets(cfg, every: int | None = None, examples: int | None = None) -> list[str]:
    """How the search's trials are scored, where the single runs' scoring would waste the search.

    A run scored once, at its end (``train.checkpoint_every: 0``, configs/ner-real.yaml), gives ASHA
    one task score per trial, so no trial can be stopped early; and all ten thousand devel sentences
    cost four minutes a checkpoint. The trials are scored every ``every`` steps (default: the
    config's checkpoints, else four per run) on ``examples`` records per source (default: the
    config's ``eval.max_examples``, else 200); the retrained runs keep the config's own scoring.
    """
    every = every or cfg.train.checkpoint_every or max(1, cfg.train.max_steps // 4)
    examples = examples or cfg.eval.max_examples or 200
    return [f"train.checkpoint_every={every}", f"eval.max_examples={examples}"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--config", default=None, help="base config (default: configs/ner-real.yaml; --small: quickstart)")
    p.add_argument("--small", action="store_true", help="the quickstart cut to minutes: checks the pieces, not the gain")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--trials", type=int, default=None, help="tune.num_samples (default: the config's)")
    p.add_argument("--search-every", type=int, default=None,
                   help="the search's trials are scored every N steps (default: the config's, else 4 per run)")
    p.add_argument("--search-examples", type=int, default=None,
                   help="records per source each trial checkpoint is scored on (default: the config's, else 200)")
    p.add_argument("--work", default="runs/mixture-search", help="folder for the runs")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    a = p.parse_args(argv)
    data = os.environ.get("BIORAY_DATA")  # the command as run, to rerun it
    command = (f"BIORAY_DATA={shlex.quote(data)} " if data else "") + shlex.join(
        ["python", "benchmarks/mixture_search.py", *(sys.argv[1:] if argv is None else argv)])
    config = a.config or (None if a.small else "configs/ner-real.yaml")
    sets = (SMALL if a.small else []) + list(a.set)
    work = Path(a.work).resolve()
    config_path = ROOT / (config or "configs/quickstart.yaml")
    config_data = yaml.safe_load(config_path.read_text())
    names = [s["name"] for s in config_data["corpus"]["sources"]]
    scoring = search_sets(load(config_path, sets), a.search_every, a.search_examples)
    started = time.time()
    head = {"config": config or "configs/quickstart.yaml", "small": a.small, "sets": sets, "seeds": a.seeds,
            "command": command}
    runs: list[dict] = []

    def train_every_seed(mixture: str, weights: dict[str, float]) -> None:
        for s in a.seeds:
            runs.append(_run(config, sets, work / f"{mixture}-seed{s}", s, mixture, weights))
            _progress(a.out, head, runs, started)

    train_every_seed("uniform", {n: 1.0 for n in names})
    search_dir = work / "search"
    tune_sets = [*sets, *scoring, f"run.dir={search_dir}", f"run.seed={a.seeds[0]}", "tune.lr=null", "tune.rank=null",
                 "tune.mixture=true", "tune.scheduler=asha"] + ([f"tune.num_samples={a.trials}"] if a.trials else [])
    _job("tune.py", tune_sets, config)
    best = yaml.safe_load((search_dir / "tune" / "best.yaml").read_text())
    weights = {n: float(best["mixture"]["weights"].get(n, 1.0)) for n in names}
    trials = json.loads((search_dir / "tune" / "result.json").read_text())
    head["searched_weights"] = weights
    head["search"] = {"dir": str(search_dir / "tune"), "scoring": scoring,
                      **{k: trials.get(k) for k in ("trials", "completed", "stopped_early", "errors", "best")}}
    _progress(a.out, head, runs, started)
    train_every_seed("searched", weights)
    out = {**head, "runs": runs, **summary(runs, weights), "wall_s": round(time.time() - started, 1), "complete": True}
    write_report(work, out, config_data)
    _write_json(a.out, out)
    print(json.dumps({k: out[k] for k in ("uniform_mean", "searched_mean", "gain", "seed_spread", "searched_weights",
                                          "wall_s", "report")}, indent=2))
    return out


if __name__ == "__main__":
    main()
