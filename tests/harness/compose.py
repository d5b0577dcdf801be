"""docker-compose as the tests run it: Debian's docker-compose validating docker-compose.yml (no Docker engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.helpers import REPO_ROOT, require_service


def compose_exe() -> str:
    """The docker-compose executable; skips (fails under CI) when it is not installed."""
    exe = shutil.which("docker-compose")
    require_service("docker-compose", exe is not None, "install Debian's docker-compose to validate the file")
    assert exe is not None
    return exe


def compose_config(env_file: Path, *profiles: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of the repository's file with `env_file`, the profiles and extra variables."""
    env = {"PATH": os.environ["PATH"], **overrides}
    return subprocess.run(
        [
            compose_exe(),
            "--project-directory",
            str(REPO_ROOT),
            "-f",
            str(REPO_ROOT / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            *(arg for profile in profiles for arg in ("--profile", profile)),
            "config",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
