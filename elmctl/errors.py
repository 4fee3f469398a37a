"""User-facing errors.

Anything a user can fix (bad recipe, missing data, busy GPU, bad URL) raises :class:`ElmctlError`
with a hint naming the next step. The CLI turns it into one message and an exit code; tracebacks
appear only with ``--debug``. Bugs are not ElmctlErrors: they keep their traceback.
"""

from __future__ import annotations

__all__ = ["ElmctlError", "UsageError", "RuntimeFailure", "EXIT_USAGE", "EXIT_RUNTIME"]

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class ElmctlError(Exception):
    """A problem the user can act on.

    Args:
        message: what is wrong, in one or more lines.
        hint: the next thing to try (printed after the message).
        exit_code: 2 for bad input/usage, 1 for runtime failures.
    """

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class UsageError(ElmctlError):
    """Bad input: recipe, flags, paths. Exit status 2."""

    exit_code = EXIT_USAGE


class RuntimeFailure(ElmctlError):
    """Something failed while running (a trial crashed, a GPU vanished). Exit status 1."""

    exit_code = EXIT_RUNTIME
