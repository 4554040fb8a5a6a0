"""Errors that reach the user as one sentence and exit code 2 instead of a traceback."""


class UsageError(Exception):
    """Bad usage or bad input: the CLI prints the message alone and exits with code 2."""
