"""Errors that light modules raise without importing torch (the command line's --help path)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, downloaded or read. The message says what to do."""
