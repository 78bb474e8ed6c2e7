"""The one exception type for bad user input: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (config key, missing folder, unreadable data); the message names it."""


class Interrupted(Exception):
    """A run stopped on Ctrl-C or SIGTERM after finishing its step and saving a checkpoint; the CLI
    prints the message as one line and exits with 128 + the signal number (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
