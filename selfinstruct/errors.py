"""User-facing errors.

Anything the user can fix (a bad file, a bad setting, an unreachable server) raises `UserError`; the CLI
prints its message as one line and exits with code 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment: one line, exit code 2, no traceback."""

    exit_code = 2


class InputFileError(UserError):
    """A malformed input file; the message starts with `file:line:` so editors can jump to it."""

    def __init__(self, path: object, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
