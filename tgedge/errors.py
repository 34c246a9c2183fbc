"""Exception types: one for user errors (bad input), one for internal bugs.

The CLI prints a `TgedgeError` as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class TgedgeError(Exception):
    """Bad input from the user: a missing file, a malformed checkpoint, a prompt that does not fit."""


class TgedgeInternalError(RuntimeError):
    """A broken invariant inside tgedge: a bug to report, not a user mistake."""
