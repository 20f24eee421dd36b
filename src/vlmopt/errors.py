"""Errors a user can cause, each carrying the exit code the CLI should return."""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class VlmoptError(Exception):
    """Bad input or bad usage: the message says what was wrong and what to do."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class CheckFailed(VlmoptError):
    """A verification or threshold check failed; nothing was committed."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage, carrying what became of the model directory (committed or not)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
