"""What every job shares: arguments, the config, Ray start-up and the exit-2 contract.

Logging set-up lives in :mod:`bioray.logs`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Optional

from bioray.config import Config, load, packaged_configs
from bioray.errors import BiorayError, ConfigError, UsageError
from bioray.logs import OneLineProgress, setup_logging
from bioray.redact import redact

# The folder bioray is imported from: a checkout, or site-packages after `pip install`.
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "quickstart"  # the packaged configs/quickstart.yaml (bioray/configs/ in the package)
# Temporary folders that Ray workers make in the system's temp folder (a checkpoint being written, a
# checkpoint downloaded from object storage); a killed run leaves them, the next job removes them.
SYSTEM_TEMP_NAMES = ("bioray-ckpt", "bioray-download")
AUTH_MODE = "RAY_AUTH_MODE"
log = logging.getLogger("bioray")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the jobs' error contract: a bad command line is one line on stderr, exit 2.

    Plain argparse prints its usage (several lines) and the error on ``sys.stderr``, which
    :func:`main` has pointed at stdout by then; here the error becomes a :class:`UsageError`.
    """

    def error(self, message: str):
        raise UsageError(f"{message} (usage: {self.prog} --help)")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Adds ``--config``, repeatable ``--set KEY=VALUE``, ``--quiet`` and ``--fresh`` to a job's parser."""
    p.add_argument("--config", default=None, metavar="FILE|NAME",
                   help=f"YAML config file, or a packaged one by name ({', '.join(packaged_configs())}); "
                        f"default: {DEFAULT_CONFIG}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; VALUE is YAML (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--fresh", action="store_true",
                   help="start training afresh even if the run has checkpoints (they are moved aside, not deleted)")


def config_from(args: argparse.Namespace) -> Config:
    """The resolved config: defaults <- --config (or the quickstart) <- --set (<- --quiet, --fresh)."""
    overrides = list(args.overrides) + (["run.quiet=true"] if args.quiet else []) \
        + (["run.resume=false"] if getattr(args, "fresh", False) else [])
    return load(args.config or DEFAULT_CONFIG, overrides)


def start(args: argparse.Namespace, check: Optional[Callable[[Config], None]] = None) -> Config:
    """What every job does first: the resolved config, logging, the job's input checks, and Ray.

    Args:
        args: The job's parsed arguments.
        check: Checks every input the job will need (files, folders, checkpoints, storage) and raises
            a BiorayError on the first bad one; it runs before Ray starts, so a typo costs a second.
    """
    cfg = config_from(args)
    setup_logging(cfg.run.quiet)
    check_auth_mode()
    if check is not None:
        check(cfg)
    from bioray.tempdirs import clean_stale

    for name in SYSTEM_TEMP_NAMES:
        clean_stale(Path(tempfile.gettempdir()), name)
    init_ray(cfg)
    return cfg


def check_auth_mode() -> None:
    """Refuses to run with Ray's token authentication turned off.

    Without it, anyone who reaches the cluster's ports can run code in it and read what it
    holds (here: patient text, model weights). Ray 2.60 turns it on by default; ``RAY_AUTH_MODE``
    set to anything but ``token`` turns it off, for clusters bioray starts and joins alike.

    Raises:
        ConfigError: naming the variable.
    """
    mode = os.environ.get(AUTH_MODE)
    if mode is not None and mode.lower() != "token":
        raise ConfigError(f"{AUTH_MODE}={mode}: bioray runs Ray with token authentication only; unset it "
                          f"(or set {AUTH_MODE}=token)")


def _token_file() -> Path:
    """Where a local Ray reads its token (Ray's own default, unless RAY_AUTH_TOKEN_PATH names one)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_private_token() -> None:
    """A token only its owner can read, before Ray starts a local cluster with it.

    Ray writes ``~/.ray/auth_token`` with the default file mode (readable by every user of the
    machine) when it generates one; bioray writes it first, mode 0600, and narrows an existing
    one of the user's that others can read.
    """
    import secrets

    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = _token_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another job wrote it first
            return
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
        return
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o600)
        log.info("%s was readable by other users; made it readable by its owner only", path)


def init_ray(cfg: Config) -> None:
    """Joins ``RAY_ADDRESS`` (or the job's cluster) if set, else starts a local Ray with token authentication."""
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # Token authentication on every cluster bioray starts (check_auth_mode refused any other
        # mode), set before Ray reads its config: explicit, so Ray neither warns that it chose it
        # nor follows a later default.
        os.environ[AUTH_MODE] = "token"
        ensure_private_token()
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # bioray's progress lines from scorer actors and validation tasks (see worker_logging).
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "bioray.logs.worker_logging"}
    bars = sys.stdout.isatty() and not cfg.run.quiet
    if not bars:
        # Bars from workers (Ray Data in train workers, transformers in scorer actors) turn logs
        # into walls of \r; the driver logs plain progress lines instead (below).
        for var in ("RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            env_vars[var] = "1"
            os.environ[var] = "1"
    if not local:
        ray.init(runtime_env=_without_job_keys(runtime_env), log_to_driver=not cfg.run.quiet,
                 configure_logging=False)
    else:
        # A local cluster: workers import bioray from where the driver did (a checkout need not be installed).
        env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # Ray's default dashboard setting (on where ray[default] is installed, failure not fatal):
        # Ray Train's PlacementGroupCleaner asks the state API, served by the dashboard, whether a
        # controller is still alive; without it the cleaner logs a warning every few seconds and
        # never frees the worker group of a controller that died (a trial ASHA stopped, say).
        ray.init(runtime_env=runtime_env, log_to_driver=not cfg.run.quiet, configure_logging=False)
    _data_progress(cfg.run.quiet)


def _without_job_keys(runtime_env: dict) -> dict:
    """Drops what a ``ray job submit`` runtime env already sets: Ray refuses to merge the same
    env var or field twice, even with equal values ("Failed to merge the Job's runtime env")."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    taken = set(job.get("env_vars") or {})
    out = {k: v for k, v in runtime_env.items() if k == "env_vars" or k not in job}
    out["env_vars"] = {k: v for k, v in runtime_env["env_vars"].items() if k not in taken}
    return out


def _data_progress(quiet: bool) -> None:
    """Ray Data progress for the datasets the driver executes (corpus build, tokenisation, mixing).

    On a terminal: bars. Otherwise Ray Data logs one plain progress line per dataset every
    ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds (default 10) instead of bars. ``--quiet``:
    neither, and Ray Data's own INFO lines (execution plans, "finished in") leave the console too;
    they still go to the session's ray-data.log.
    """
    import ray.data

    from bioray._ray import DATA_PROGRESS_LOGGER, say_once_already
    from bioray.logs import PROGRESS_OFF_WARNINGS

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    # Without a terminal, one line per dataset per interval, not one per operator as well.
    ctx.enable_operator_progress_bars = sys.stdout.isatty()
    logging.getLogger(DATA_PROGRESS_LOGGER).addFilter(OneLineProgress())
    # Ray Data warns once per process that (operator) bars are off; that is what was asked for.
    say_once_already(*PROGRESS_OFF_WARNINGS)
    # Ray Data configures its "ray.data" logger (own console handler, propagate=False) when it is
    # imported, so the level set in setup_logging does not reach it: quiet its console handler.
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING if quiet else logging.INFO)


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
            # Secrets masked: a message may quote a library's error, which may quote the environment.
            print(redact(f"bioray: error: {e}"), file=real_stderr, flush=True)
            sys.exit(2)
        except Exception:
            print(redact(traceback.format_exc()), file=real_stderr, end="", flush=True)
            sys.exit(1)

    return wrapper
