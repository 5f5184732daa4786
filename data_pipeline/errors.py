"""The error every data problem is reported as: one message naming the file and what to do."""


class DataError(RuntimeError):
    """Data that cannot be used. The message names the path and what to do about it."""
