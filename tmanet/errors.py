"""The toolkit's user-facing error: a problem with the user's input or files, reported as one line.

It lives in the core so every package can raise it without importing the CLI (the application layer)."""


class UserError(Exception):
    """A problem with the user's input: printed as one message, exit status 2, no traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread so cleanup (temporary files) runs as for Ctrl-C.
    ``signum`` is the signal; the command exits with status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
