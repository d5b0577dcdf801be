"""Rich consoles for the command line: results on stdout, progress and messages on stderr."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped output (scripts, logs, CI) gets wide tables instead of rich's 80-column default with ellipses.
PIPE_WIDTH = 200


def stdout_console() -> Console:
    """A console for results; wide when stdout is not a terminal."""
    return Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)


def stderr_console() -> Console:
    """A console for progress and messages."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)
