"""The one door to Ray's private and version-specific names.

bioray uses a few things Ray 2.60 does not export publicly (Ray Train V2's callback and
validation classes live under ``ray.train.v2``; two loggers are named after private modules).
They are all imported here, and ``tests/test_layers.py`` imports each one, so an upgrade that
moves them fails one test that names the Ray version instead of a job half-way through.
"""

from __future__ import annotations

import logging

# ray.train.UserCallback's home: the ray.train re-export exists only when RAY_TRAIN_V2_ENABLED
# was set before ray.train was first imported, which a library cannot count on.
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

# Ray Data's non-TTY progress lines come from this logger (bioray folds them into one line).
DATA_PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"

__all__ = ["DATA_PROGRESS_LOGGER", "UserCallback", "ValidationConfig", "ValidationTaskConfig",
           "quiet_train_report_lines", "say_once_already"]


def quiet_train_report_lines() -> None:
    """Drops Ray Train's per-worker "Reporting training result N: ..." INFO lines.

    Ray 2.60 logs them under ``logging.getLogger(__file__)`` of its private context module,
    outside ``ray.train``, so ``RunConfig(logging_config=...)`` does not reach them.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def say_once_already(*keys: str) -> None:
    """Marks Ray's warn-once keys as said, for warnings about what bioray asked for on purpose."""
    from ray.util.debug import log_once

    for key in keys:
        log_once(key)
