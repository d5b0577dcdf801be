"""The base of every error a user can meet; each message says what went wrong and what to do."""

from __future__ import annotations


class AllscoreError(Exception):
    """An error a user can meet and act on; the message names the input and says what to do.

    Subclasses live beside the code that raises them (``core.storage.StorageError``,
    ``core.imaging.DecodeError``, ...); the command line catches this base to print the message
    without a traceback.

    ``exit_code`` is the command line's exit status for it (README, "Exit codes"): 3, the request was refused
    as given; subclasses say 4 (what was named does not exist) or 5 (a service could not be reached).
    """

    exit_code = 3


# The command line's exit statuses (README, "Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1  # the work ran and some of it failed: submit --wait with a sample failed or cancelled, ...
EXIT_USAGE = 2  # a command used wrongly: an unknown option, a missing argument, a bad value (Click's own)
EXIT_REFUSED = 3  # an AllscoreError: the request cannot be done as given; the message says why and what to do
EXIT_NOT_FOUND = 4  # the sample, job or thing named does not exist, or nothing was left to do to it
EXIT_UNAVAILABLE = 5  # the database, the broker or the object store could not be reached
