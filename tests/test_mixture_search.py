"""benchmarks/mixture_search.py's verdict: gain and seed spread from its runs (seconds, no Ray)."""

import importlib.util

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("mixture_search", ROOT / "benchmarks" / "mixture_search.py")
ms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ms)


def _run(mixture, seed, f1s):
    scores = {f"s{k}": {"f1": v, "parse_rate": 1.0, "n": 10} for k, v in enumerate(f1s)}
    return {"mixture": mixture, "seed": seed, "eval": scores, "mean": ms.mean_score(scores)}


def test_gain_is_searched_minus_uniform_averaged_over_seeds_and_spread_the_noise_floor():
    runs = [_run("uniform", 0, [0.40, 0.50, 0.60]), _run("uniform", 1, [0.42, 0.50, 0.64]),
            _run("searched", 0, [0.50, 0.50, 0.62]), _run("searched", 1, [0.49, 0.52, 0.66])]
    assert [r["mean"] for r in runs] == pytest.approx([0.50, 0.52, 0.54, 0.55667], abs=1e-5)
    out = ms.summary(runs, {"s0": 0.5, "s1": 0.2, "s2": 0.3})
    assert out["uniform_mean"] == pytest.approx(0.51) and out["searched_mean"] == pytest.approx(0.548333, abs=1e-6)
    assert out["gain"] == pytest.approx(0.038333, abs=1e-6)
    assert out["seed_spread_uniform"] == pytest.approx(0.02) and out["seed_spread_searched"] == pytest.approx(0.016667, abs=1e-6)
    assert out["seed_spread"] == pytest.approx(0.02)
    assert out["gain_beats_noise"] is True and out["searched_weights"]["s0"] == 0.5


def test_a_gain_inside_the_seed_spread_is_not_a_finding():
    runs = [_run("uniform", 0, [0.40]), _run("uniform", 1, [0.50]), _run("searched", 0, [0.47]),
            _run("searched", 1, [0.48])]
    out = ms.summary(runs, {"s0": 1.0})
    assert out["gain"] == pytest.approx(0.025) and out["seed_spread"] == pytest.approx(0.10)
    assert out["gain_beats_noise"] is False
    assert ms.seed_spread([0.3]) == 0.0 and ms.gain([0.5], [0.49]) == pytest.approx(-0.01)


def test_search_plot_has_a_panel_per_source_weight_labelled_for_a_reader():
    from bioray.config import load
    from bioray.tune import search_figure

    rows = [{"trial": f"t{i}", "state": state, "score": 0.5 + i / 10, "steps": 24, "lr": 1e-3, "rank": 8,
             "weight.a": a, "weight.b": round(1 - a, 2), "dir": f"/d/t{i}"}
            for i, (state, a) in enumerate([("completed", 0.3), ("stopped early", 0.6), ("completed", 0.5)])]
    fig = search_figure(rows, load("configs/quickstart.yaml"))
    assert [ax.get_xlabel() for ax in fig.axes if ax.axison] == ["weight of a", "weight of b"]  # lr, rank fixed
    rows = [{**r, "lr": 1e-3 * (i + 1), "weight.a": 0.5, "weight.b": 0.5} for i, r in enumerate(rows)]
    fig = search_figure(rows, load("configs/quickstart.yaml"))
    assert [ax.get_xlabel() for ax in fig.axes if ax.axison] == ["lr"] and fig.axes[0].get_xscale() == "log"
    rows = [{**r, "weight.a": 0.1 * (i + 1)} for i, r in enumerate(rows)]
    by_task = search_figure(rows, load("configs/quickstart.yaml", ["mixture.by=task", "mixture.weights={}"]))
    assert [ax.get_xlabel() for ax in by_task.axes if ax.axison] == ["lr", "weight of task a"]
