"""One exception type for user errors: a one-line message, caught once at the CLI boundary."""


class CapError(Exception):
    """A user error (bad config, data, checkpoint or adapter), reported as one line, exit code 2.

    Internal bugs raise ordinary exceptions and keep their tracebacks.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
