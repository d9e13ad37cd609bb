"""The one exception type that means "the user gave us something wrong".

Command-line entrypoints catch `UserError` and print its message as one line with a non-zero
exit (no traceback). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, data, arguments, environment).

    The message must name what was expected and what was found, and say how to fix it.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
