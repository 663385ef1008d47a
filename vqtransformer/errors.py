"""The one base class of user errors: bad input, configuration, data, checkpoints or missing weights.

Every exception whose message tells the user which config key or file to fix derives from
:class:`UserError`; the command-line entry points (:mod:`vqtransformer.cli`) print such an error in one
line and exit 2, and let anything else (a bug) raise with its traceback. This module imports nothing.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the config key or file and what to do."""
