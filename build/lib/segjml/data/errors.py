"""Errors about data sets, reported to the user as one line."""


class DataError(RuntimeError):
    """A data-set root, split or file that cannot be used; the message names the path and the fix."""
