"""Logging set-up for the driver and for Ray's worker processes.

Progress goes to stdout as plain timestamped lines; stderr is kept for the one-line error of a
bad input (``bioray.cli.main``). Ray's workers get the same "bioray" logger through Ray's
``worker_process_setup_hook`` (:func:`worker_logging`).
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(message)s"
DATEFMT = "%H:%M:%S"
NOISY = ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed", "deepspeed", "transformers", "filelock")
# Ray Data warns once per process that progress bars are off: they are off on purpose.
PROGRESS_OFF_WARNINGS = ("ray_data_progress_manager_disabled", "ray_data_progress_manager_global")


def setup_logging(quiet: bool) -> None:
    """Plain timestamped progress lines on stdout (warnings only with ``quiet``).

    Ray's own driver-side logs go through the same handler (``configure_logging=False`` in
    ``bioray.cli.init_ray``), so a bad input found after Ray started still leaves exactly one
    line on stderr.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=FORMAT, datefmt=DATEFMT,
                        stream=sys.stdout)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet or not sys.stdout.isatty():
        # transformers' "Loading weights"/"Writing model shards" bars are \r walls in a log; read
        # when transformers is imported, so set before (and inherited by Ray's workers).
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def worker_logging() -> None:
    """Ray's ``worker_process_setup_hook``: the "bioray" logger prints INFO lines in every worker.

    Ray leaves a worker's root logger at WARNING (Ray Train configures its own workers only), so
    the scorer's "examples/s" lines and the validation task's scores were dropped; Ray forwards
    what a worker prints to the driver's stdout (not with ``--quiet``: ``log_to_driver=False``).
    The logger stops at its own handler, so lines are not doubled where root prints too.
    """
    from bioray._ray import say_once_already

    logger = logging.getLogger("bioray")
    if not any(getattr(h, "_bioray", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATEFMT))
        handler._bioray = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # The training set's progress is off on purpose (bioray.train.fit); no warning about it.
    say_once_already(PROGRESS_OFF_WARNINGS[0])


class OneLineProgress(logging.Filter):
    """Folds Ray Data's non-TTY progress block into one line: ``<dataset>: <rows>/<total> rows``.

    Ray Data (2.60) logs a block every interval: a ``==== Running Dataset: X ====`` header, a
    ``Total Progress: n/m`` line, a resources line and a ``====`` footer. Lines of any other shape
    pass through unchanged, so a future format shows more lines rather than none.
    """

    dataset = "dataset"

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("======= Running Dataset: "):
            self.dataset = msg[len("======= Running Dataset: "):].strip(" =")
            return False
        if msg.startswith("Total Progress: "):
            record.msg, record.args = f"{self.dataset}: {msg[len('Total Progress: '):]} rows", ()
            return True
        return not (msg.startswith("Active & requested resources: ") or msg == "" or set(msg) == {"="})
