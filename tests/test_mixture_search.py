"""benchmarks/mixture_search.py: its verdict (gain and seed spread) from made-up runs (seconds, no Ray),
and the whole experiment end to end on slices of the real corpora (minutes)."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_job

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


def test_each_stage_rewrites_out_marked_incomplete_so_a_cut_run_keeps_what_it_measured(tmp_path):
    # The real benchmark runs ~2.5 hours: one stopped before its last run must still leave the
    # runs it finished in --out, and say that it is not the verdict.
    out, started = tmp_path / "sub" / "m.json", time.time()
    head = {"config": "c.yaml", "seeds": [0, 1]}
    ms._progress(str(out), head, [_run("uniform", 0, [0.4])], started)
    first = json.loads(out.read_text())
    assert first["complete"] is False and [r["seed"] for r in first["runs"]] == [0] and first["config"] == "c.yaml"
    ms._progress(str(out), head, [_run("uniform", 0, [0.4]), _run("uniform", 1, [0.5])], started)
    assert [r["mean"] for r in json.loads(out.read_text())["runs"]] == pytest.approx([0.4, 0.5])
    assert "gain" not in first and first["wall_s"] >= 0


# ---------------------------------------------------------------------------- report.md

CONFIG = {"corpus": {"sources": [  # references made up: the report must print these, not the paper's
    {"name": "s0", "task": "ner", "reference": {"metric": "f1", "paper_7b": 80.0, "paper_13b": 81.5,
                                                "encoder": {"name": "EncA", "score": 90.0}}},
    {"name": "s1", "task": "ner", "reference": {"metric": "f1", "paper_7b": 70.5,
                                                "encoder": {"name": "EncA", "score": 80.0}}},
    {"name": "s2", "task": "ner", "reference": {"metric": "f1", "paper_7b": 60.25,
                                                "encoder": {"name": "EncA", "score": 70.0}}},
]}}


def _out(f1s: dict, weights: dict, **search) -> dict:
    """A benchmark output from made-up runs ({(mixture, seed): per-source F1}), as main() assembles it."""
    runs = []
    for (mixture, seed), scores in f1s.items():
        run = _run(mixture, seed, scores)
        w = weights if mixture == "searched" else {n: 1.0 for n in weights}
        runs.append({**run, "weights": w, "split": "validation", "seconds": 1234.5,
                     "records_per_epoch": {"s0": 100 + seed, "s1": 50, "s2": 25} if mixture == "searched" else None})
    return {"config": "configs/x.yaml", "small": False, "sets": ["train.max_steps=9"], "seeds": [0, 1],
            "command": "python benchmarks/mixture_search.py --out m.json", "runs": runs,
            "search": {"dir": "/w/search/tune", "trials": 8, "completed": 3, "stopped_early": 5, "errors": 0,
                       "best": {"trial": "t_00004", "state": "completed", "score": 0.61, "steps": 300}, **search},
            **ms.summary(runs, weights), "wall_s": 7200.0}


FOUND = {("uniform", 0): [0.40, 0.50, 0.60], ("uniform", 1): [0.42, 0.50, 0.64],
         ("searched", 0): [0.50, 0.50, 0.62], ("searched", 1): [0.49, 0.52, 0.66]}


def _rows(text: str, section: str) -> dict[str, list[str]]:
    """The table under ``## section``, as {first cell: the other cells}."""
    part = text.split(f"## {section}\n")[1].split("\n## ")[0]
    return {cells[0]: cells[1:] for line in part.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_report_puts_each_seed_and_the_mean_beside_the_config_references():
    text = ms.report_markdown(_out(FOUND, {"s0": 0.5, "s1": 0.2, "s2": 0.3}), CONFIG)
    rows = _rows(text, "Scores")
    assert rows["source"] == ["uniform seed 0", "uniform seed 1", "uniform mean", "searched seed 0", "searched seed 1",
                              "searched mean", "paper_7b", "paper_13b", "encoder"]
    assert rows["s0"] == ["40.00", "42.00", "41.00", "50.00", "49.00", "49.50", "80.0", "81.5", "90.0 (EncA)"]
    assert rows["s1"] == ["50.00", "50.00", "50.00", "50.00", "52.00", "51.00", "70.5", "", "80.0 (EncA)"]
    # the mean row: each run's mean over sources, summary()'s means, a reference's mean where every source has one
    assert rows["mean"] == ["50.00", "52.00", "51.00", "54.00", "55.67", "54.83", "70.25", "", "80.00 (EncA)"]
    assert "Entity F1 of each source on the `validation` split" in text
    # the mixtures: weights with their shares, each run's records per epoch where its result.json had them
    mix = _rows(text, "The mixtures")
    assert mix["source"] == ["uniform weight (share)", "searched weight (share)", "searched seed 0: records/epoch",
                             "searched seed 1: records/epoch"]
    assert mix["s0"] == ["1 (33.3%)", "0.5 (50.0%)", "100", "101"] and mix["total"] == ["", "", "175", "176"]
    assert "`t_00004` (completed, task score 61.00 after 300 steps, seed 0)" in text
    assert ("- Seed spread (max - min of one setting's per-seed means): uniform 2.00, searched 1.67; "
            "the larger, 2.00, is the noise floor.") in text
    assert "- Gain (searched mean - uniform mean, each over seeds): +3.83 points (51.00 -> 54.83)." in text
    assert "**yes**: the gain (+3.83 points) is at least 1.00 points and larger than the seed spread (2.00)" in text
    assert "8 trials, 3 completed, 5 stopped early by ASHA" in text and "7,200 s (2.0 h)" in text
    assert "`python benchmarks/mixture_search.py --out m.json`" in text and "`train.max_steps=9`" in text
    assert "search.png" not in text  # no plot given: none shown


def test_report_says_a_gain_inside_the_spread_or_under_a_point_is_not_a_finding():
    inside = _out({("uniform", 0): [0.40, 0.40, 0.40], ("uniform", 1): [0.50, 0.50, 0.50],
                   ("searched", 0): [0.47, 0.47, 0.47], ("searched", 1): [0.48, 0.48, 0.48]}, {"s0": 1, "s1": 1, "s2": 1})
    text = ms.report_markdown(inside, CONFIG)
    assert inside["gain_beats_noise"] is False
    assert "**no**: the gain (+2.50 points) is inside the seed spread (10.00): not a finding." in text
    small = _out({("uniform", 0): [0.500] * 3, ("uniform", 1): [0.502] * 3,
                  ("searched", 0): [0.506] * 3, ("searched", 1): [0.507] * 3}, {"s0": 1, "s1": 1, "s2": 1})
    assert small["gain"] > small["seed_spread"] and small["gain_beats_noise"] is False
    assert "**no**: the gain (+0.55 points) is below 1.00 points: not a finding." in ms.report_markdown(small, CONFIG)
    worse = _out({("uniform", 0): [0.5] * 3, ("uniform", 1): [0.5] * 3,
                  ("searched", 0): [0.4] * 3, ("searched", 1): [0.4] * 3}, {"s0": 1, "s1": 1, "s2": 1})
    assert ("the gain (-10.00 points) is below 1.00 points and inside the seed spread (0.00)"
            in ms.report_markdown(worse, CONFIG))


def test_write_report_copies_the_search_plot_beside_report_md_and_names_both(tmp_path):
    tune_dir = tmp_path / "search" / "tune"
    tune_dir.mkdir(parents=True)
    (tune_dir / "search.png").write_bytes(b"\x89PNG made up")
    out = _out(FOUND, {"s0": 0.5, "s1": 0.2, "s2": 0.3}, dir=str(tune_dir))
    path = ms.write_report(tmp_path, out, CONFIG)
    assert path == tmp_path / "report.md" and out["report"] == str(path) and out["search"]["plot"] == "search.png"
    assert (tmp_path / "search.png").read_bytes() == b"\x89PNG made up"
    assert "](search.png)" in path.read_text() and "| mean | 50.00 |" in path.read_text()
    (tune_dir / "search.png").unlink()
    (tmp_path / "search.png").unlink()
    ms.write_report(tmp_path, out, CONFIG)
    assert out["search"]["plot"] is None and "search.png" not in path.read_text()


def test_search_plot_has_a_panel_per_source_weight_labelled_for_a_reader():
    from bioray.config import load
    from bioray.tune import search_figure

    rows = [{"trial": f"t{i}", "state": state, "score": 0.5 + i / 10, "steps": 24, "lr": 1e-3, "rank": 8,
             "weight.a": a, "weight.b": round(1 - a, 2), "dir": f"/d/t{i}"}
            for i, (state, a) in enumerate([("completed", 0.3), ("stopped early", 0.6), ("completed", 0.5)])]
    fig = search_figure(rows, load("configs/quickstart.yaml", ["run.dir=/home/someone/runs/mix-search"]))
    assert [ax.get_xlabel() for ax in fig.axes if ax.axison] == ["weight of a", "weight of b"]  # lr, rank fixed
    assert fig._suptitle.get_text() == "mix-search: 3 trials (score: best checkpoint; stopped trials: latest)"
    rows = [{**r, "lr": 1e-3 * (i + 1), "weight.a": 0.5, "weight.b": 0.5} for i, r in enumerate(rows)]
    fig = search_figure(rows, load("configs/quickstart.yaml"))
    assert [ax.get_xlabel() for ax in fig.axes if ax.axison] == ["lr"] and fig.axes[0].get_xscale() == "log"
    rows = [{**r, "weight.a": 0.1 * (i + 1)} for i, r in enumerate(rows)]
    by_task = search_figure(rows, load("configs/quickstart.yaml", ["mixture.by=task", "mixture.weights={}"]))
    assert [ax.get_xlabel() for ax in by_task.axes if ax.axison] == ["lr", "weight of task a"]


def _slice_iob(src: Path, dst: Path, sentences: int) -> int:
    """The first ``sentences`` sentences of an IOB file (blank-line separated); returns how many."""
    blocks = [b for b in src.read_text().split("\n\n") if b.strip()][:sentences]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n\n".join(b.strip("\n") for b in blocks) + "\n\n")
    return len(blocks)


@pytest.mark.e2e
def test_the_real_data_experiment_runs_end_to_end_on_slices_of_the_corpora(shared_data, cache_dir, tmp_path):
    # configs/ner-real.yaml as it is (pretrain_on: inputs, full fine-tuning, scored once at the end,
    # eval.max_examples: null, constrained decoding), on 40 train / 12 devel sentences of each real
    # corpus and a model cut to seconds: the uniform mixture, the Tune search over the weights, the best
    # weights retrained; the scores mean nothing, the plumbing does. One seed (three jobs, not five):
    # averaging over seeds and the spread are the arithmetic the tests above check.
    cfg = yaml.safe_load((ROOT / "configs" / "ner-real.yaml").read_text())
    assert cfg["model"]["tiny"]["pretrain_on"] == "inputs" and cfg["eval"]["max_examples"] is None
    devel = {}
    for s in cfg["corpus"]["sources"]:
        for split, n in (("train", 40), ("validation", 12)):
            src = Path(s["files"][split].replace("${BIORAY_DATA}", str(shared_data)))
            dst = tmp_path / "data" / s["name"] / src.name
            got = _slice_iob(src, dst, n)
            s["files"][split] = str(dst)
        devel[s["name"]] = got
    cfg["model"]["tiny"].update(vocab_size=600, hidden_size=64, num_layers=1, num_heads=2, pretrain_steps=10)
    cfg["data"].update(max_seq_len=256, cache_dir=str(cache_dir))
    cfg["train"].update(max_steps=6, report_every=3)
    cfg["tune"] = {"num_samples": 2, "grace_steps": 3}
    cfg["run"]["quiet"] = True
    config = tmp_path / "ner-real-slices.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    work, out_file = tmp_path / "work", tmp_path / "mixture.json"
    proc = run_job("benchmarks/mixture_search.py", "--config", config, "--out", out_file, "--work", work,
                   "--search-every", 3, "--search-examples", 5, "--seeds", 0, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(out_file.read_text())
    runs = out["runs"]
    assert out["complete"] is True
    assert [(r["mixture"], r["seed"]) for r in runs] == [("uniform", 0), ("searched", 0)]
    for r in runs:  # every devel sentence of every source scored, by constrained decoding (answers parse)
        assert {k: v["n"] for k, v in r["eval"].items()} == devel, r["run_dir"]
        assert all(v["parse_rate"] == 1.0 for v in r["eval"].values())
        used = yaml.safe_load((Path(r["run_dir"]) / "bioray.yaml").read_text())
        assert used["model"]["tiny"]["pretrain_on"] == "inputs"  # the base never read an answer
        result = json.loads((Path(r["run_dir"]) / "result.json").read_text())  # the JSON is each run's own
        assert {k: v["f1"] for k, v in r["eval"].items()} == {k: v["f1"] for k, v in result["eval"].items()}
        assert r["mean"] == pytest.approx(sum(v["f1"] for v in r["eval"].values()) / 3)
    assert out["search"]["trials"] == 2 and set(out["searched_weights"]) == set(devel)
    assert runs[1]["weights"] == out["searched_weights"]
    # The trials: scored at two checkpoints on 5 records per source (ASHA has a rung to stop at),
    # while the retrained runs above scored every devel sentence once.
    assert out["search"]["scoring"] == ["train.checkpoint_every=3", "eval.max_examples=5"]
    for trial in (Path(out["search"]["dir"]) / "trials").iterdir():
        result = json.loads((trial / "result.json").read_text())
        assert {k: v["n"] for k, v in result["eval"].items()} == {k: 5 for k in devel}, trial
        assert len(result["checkpoints"]) == 2, trial
    assert out["gain"] == pytest.approx(runs[1]["mean"] - runs[0]["mean"]) and out["seed_spread"] == 0
    report = Path(out["report"]).read_text()
    assert "search.png" in report and (work / "search.png").is_file()
    assert "seed 0" in report or "seed0" in report, report[:2000]
