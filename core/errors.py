"""The base of every error a user can meet; each message says what went wrong and what to do."""

from __future__ import annotations


class AllscoreError(Exception):
    """An error a user can meet and act on; the message names the input and says what to do.

    Subclasses live beside the code that raises them (``core.storage.StorageError``,
    ``core.imaging.DecodeError``, ...); the command line catches this base to print the message
    without a traceback.
    """
