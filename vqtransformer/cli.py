"""What the command-line entry points (train.py, evaluate.py, sample.py) share: user errors end
the command with one line naming what to fix and exit code 2, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from vqtransformer.errors import UserError


def is_user_error(e: BaseException) -> bool:
    """Bad input or configuration (a :class:`~vqtransformer.errors.UserError`): its message says what to fix."""
    return isinstance(e, UserError)


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
