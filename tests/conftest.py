"""Shared fixtures: the project root, the real data folder, and one local Ray per session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The data root that ${BIORAY_DATA} in configs (configs/ner-real.yaml) reads: the real data here.
os.environ.setdefault("BIORAY_DATA", str(SHARED_DATA))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the project)")
    return SHARED_DATA


def run_job(*args, env=None, timeout=900):
    """Runs a job script from the project root, as a user would."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One bioray cache per test session: the tiny base is built once, shared by the job tests."""
    return tmp_path_factory.mktemp("bioray-cache")
