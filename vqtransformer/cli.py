"""What the command-line entry points (train.py, evaluate.py, sample.py) share: user errors end
the command with one line naming what to fix and exit code 2, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

#: exceptions raised for bad input or configuration; their message says which key or file to fix
USER_ERRORS = frozenset({"ConfigError", "DataError", "WeightsUnavailableError", "CheckpointError", "TrainingDiverged",
                         "ConditionError", "EvaluationError"})


def is_user_error(e: BaseException) -> bool:
    return type(e).__name__ in USER_ERRORS


def run_or_exit(fn: Callable, *args, name: str = "vqtransformer", reraise: bool = False):
    """``fn(*args)``; a user error is logged, printed as ``error: ...`` and exits 2 (unless ``reraise``,
    e.g. inside a Hydra multirun, where the launcher records the failed job)."""
    try:
        return fn(*args)
    except Exception as e:
        if not is_user_error(e) or reraise:
            raise
        logging.getLogger(name).error("%s: %s", type(e).__name__, e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
