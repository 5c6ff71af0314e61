"""The `bioray` command and the job scripts: one definition of each job, packaged configs, an installed wheel."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bioray import cli, commands
from bioray.config import load
from conftest import ROOT

JOB_SCRIPTS = {"prepare": "prepare.py", "finetune": "finetune.py", "evaluate": "evaluate.py", "tune": "tune.py",
               "export": "export.py", "data fetch": "fetch_data.py"}


def test_packaged_configs_are_the_top_level_configs():
    # configs/ is what a checkout, the docs and ray job submit --working-dir use; bioray/configs/ is
    # what the wheel ships. Edit one, copy it to the other: cp configs/X.yaml bioray/configs/
    top = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.yaml")}
    packaged = {p.name: p.read_bytes() for p in (ROOT / "bioray" / "configs").glob("*.yaml")}
    assert sorted(top) == sorted(packaged)
    for name in top:
        assert top[name] == packaged[name], f"configs/{name} differs from bioray/configs/{name}: copy one over the other"


def test_no_config_means_the_packaged_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(config=None, overrides=[], quiet=False)
    assert cli.config_from(args) == load(ROOT / "configs" / "quickstart.yaml")


def test_every_job_script_is_one_of_the_commands():
    assert sorted(JOB_SCRIPTS) == sorted(commands.COMMANDS)
    for name, script in JOB_SCRIPTS.items():
        assert f'main = commands.script("{name}")' in (ROOT / "jobs" / script).read_text()
    assert sorted(p.name for p in (ROOT / "jobs").glob("*.py")) == sorted(JOB_SCRIPTS.values())


def _help(*argv) -> str:
    proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _options(help_text: str) -> list[str]:
    return sorted({w.strip("[],()|") for w in help_text.split() if w.strip("[],()|").startswith("--")})


@pytest.mark.parametrize("name", list(JOB_SCRIPTS))
def test_the_command_and_the_job_script_take_the_same_arguments(name):
    job = _help(str(ROOT / "jobs" / JOB_SCRIPTS[name]))
    command = _help("-m", "bioray", *name.split())
    assert _options(job) == _options(command) and "--quiet" in _options(job)
    assert commands.COMMANDS[name].help.split()[0] in job


def test_bioray_help_lists_every_command():
    out = _help("-m", "bioray")
    assert all(f"    {name.split()[0]} " in out for name in commands.COMMANDS)


@pytest.mark.e2e
def test_an_installed_wheel_runs_the_quickstart_from_an_empty_folder(tmp_path):
    """Builds the wheel, installs it (no dependencies, nothing downloaded) into a fresh venv that sees
    this environment's packages, and runs `bioray` from an empty folder with no checkout on the path."""
    start = time.monotonic()
    src = tmp_path / "src"  # pip builds in the source tree (build/, *.egg-info): a copy keeps the checkout clean
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}

    def run(*argv, cwd=tmp_path, timeout=300):
        proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=clean, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
        tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("bioray-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python = venv / "bin" / "python"
    # --system-site-packages sees the base interpreter's packages, not a venv's: point the new venv at
    # this environment's site-packages folders too (a .pth line each; .pth files in those folders are not
    # run, so an editable install of the checkout there stays invisible).
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    parents = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "_bioray_test_parent.pth").write_text("".join(p + "\n" for p in parents))
    # --ignore-installed: where this environment holds bioray as a plain install (CI's `pip install .`), pip
    # would see it through the .pth line, call the wheel "already satisfied" and install nothing.
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel)

    empty = tmp_path / "empty"
    empty.mkdir()
    where = run(python, "-c", "import bioray; print(bioray.__file__)", cwd=empty).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed package, not the checkout
    bioray = venv / "bin" / "bioray"
    assert "finetune" in run(bioray, "--help", cwd=empty).stdout
    cache = tmp_path / "cache"

    # One job (finetune prepares the corpus first): a second Ray start would cost CI half a minute.
    run(bioray, "finetune", "--config", "quickstart", "--set", "train.max_steps=10",
        "--set", "model.tiny.pretrain_steps=30", "--set", "eval.max_examples=8", "--set", f"data.cache_dir={cache}",
        cwd=empty, timeout=1200)
    # The quickstart's relative run.dir and corpus.sample_dir land in the folder it ran from.
    assert (empty / "runs" / "sample-data" / "ner_train.tsv").is_file()
    assert (empty / "runs" / "quickstart" / "corpus" / "manifest.json").is_file()
    result = json.loads((empty / "runs" / "quickstart" / "result.json").read_text())
    assert result["train"]["steps"] == 10
    assert sorted(result["eval"]) == ["sample_clinical_nli", "sample_disease_ner", "sample_gene_disease_re"]
    assert Path(result["best_checkpoint"]).is_relative_to(empty / "runs" / "quickstart" / "checkpoints")
    print(f"wheel build + install + finetune: {time.monotonic() - start:.0f} s")
