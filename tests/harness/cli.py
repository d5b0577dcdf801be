"""The command line as a user or a lab pipeline runs it: `python -m allscore ARGS` in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def run_allscore(
    *args: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `allscore ARGS` with this process's environment plus `env`; with check, fail the test (showing the end
    of stderr) unless it exits 0. TensorFlow's start-up lines are kept quiet unless the environment says otherwise."""
    result = subprocess.run(
        [sys.executable, "-m", "allscore", *args],
        env={"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, f"allscore {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result
