"""Errors that end a run with a clear message and a documented exit code."""

#: Exit codes of ``cst-report`` and ``cst-integrity`` (documented in README).
EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_ASSESSABLE = 3
EXIT_BUSY = 4


class CSTError(Exception):
    """Base class of the errors the command line reports without a traceback."""

    exit_code = EXIT_INTERNAL_ERROR

    def __init__(self, message, *, path=None, fix=None):
        super().__init__(message)
        self.message = message
        self.path = path
        self.fix = fix

    def __str__(self):
        text = self.message
        if self.path is not None:
            text = f"{text}\n  file: {self.path}"
        if self.fix:
            text = f"{text}\n  fix:  {self.fix}"
        return text


class InputError(CSTError):
    """The input cannot be trusted: nothing was computed from it."""

    exit_code = EXIT_BAD_INPUT


class BusyError(CSTError):
    """Another run is processing the same subject with the same work directory."""

    exit_code = EXIT_BUSY
