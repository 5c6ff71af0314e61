"""What every job shares: arguments, logging, Ray start-up and the exit-2 contract."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from bioray.config import Config, load
from bioray.errors import BiorayError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "quickstart.yaml"
log = logging.getLogger("bioray")


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every job takes: ``--config``, repeatable ``--set KEY=VALUE``, ``--quiet``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; VALUE is YAML (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def config_from(args: argparse.Namespace) -> Config:
    """The resolved config: defaults <- --config (or the quickstart) <- --set (<- --quiet)."""
    overrides = list(args.overrides) + (["run.quiet=true"] if args.quiet else [])
    return load(args.config or DEFAULT_CONFIG, overrides)


def setup_logging(quiet: bool) -> None:
    """Plain timestamped progress lines on stdout; stderr is kept for the one-line error.

    Ray's own driver-side logs go through the same handler (``configure_logging=False`` in
    :func:`init_ray`), so a bad input found after Ray started still leaves exactly one line on
    stderr.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed", "deepspeed", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(cfg: Config) -> None:
    """Joins ``RAY_ADDRESS`` (or the job's cluster) if set, else starts a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}
    bars = sys.stdout.isatty() and not cfg.run.quiet
    if not bars:
        # Bars from workers and Ray Data's split coordinator turn logs into walls of \r; Ray
        # Data still logs a plain progress line every few seconds.
        env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env_vars}, log_to_driver=not cfg.run.quiet, configure_logging=False)
    else:
        # A local cluster: workers import bioray from this checkout even when it is not installed.
        env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        ray.init(runtime_env={"env_vars": env_vars}, include_dashboard=False, log_to_driver=not cfg.run.quiet,
                 configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = bars


def main(fn: Callable[[], None]) -> Callable[[], None]:
    """Runs a job's main; bad config or input prints one line on stderr and exits 2.

    Everything else the job, Ray and its child processes print, warnings included, goes to
    stdout (file descriptor 2 is pointed at 1 while the job runs), so stderr holds only the
    error: one line for bad input, a traceback for a bug (exit 1).
    """

    @functools.wraps(fn)
    def wrapper() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        real_stderr = os.fdopen(os.dup(2), "w")
        os.dup2(1, 2)
        try:
            fn()
        except BiorayError as e:
            print(f"bioray: error: {e}", file=real_stderr, flush=True)
            sys.exit(2)
        except Exception:
            traceback.print_exc(file=real_stderr)
            real_stderr.flush()
            sys.exit(1)

    return wrapper
