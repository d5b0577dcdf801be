"""The command line's exit statuses (README, "Exit codes"): usage, refused, not found and unreachable differ."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE
from db.migrate import upgrade
from tests.harness.cli import run_allscore


def allscore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_allscore(*args, env=env, check=False, timeout=120)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'allscore.db'}"
    upgrade(url)
    return {"ALLSCORE_HOME": str(tmp_path / "home"), "ALLSCORE_DATABASE_URL": url}


def test_each_kind_of_error_has_its_own_exit_status(env: dict[str, str], tmp_path: Path) -> None:
    codes = {EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_NOT_FOUND, EXIT_UNAVAILABLE}
    assert len(codes) == 5 and 1 not in codes  # 1 is "the work ran and some of it failed"
    ok = allscore("--version", env=env)
    assert ok.returncode == EXIT_OK and ok.stdout.startswith("allscore ")
    # Usage: an unknown option, and a command without what it needs.
    assert allscore("status", "--no-such-option", env=env).returncode == EXIT_USAGE
    missing = allscore("status", env=env)
    assert missing.returncode == EXIT_USAGE and "SAMPLE_ID or --job" in missing.stderr
    assert allscore("cancel", env=env).returncode == EXIT_USAGE
    # Refused: the request cannot be done as given, with the reason and no traceback.
    refused = allscore("submit", "S-1", str(tmp_path / "no-such-folder"), env=env)
    assert refused.returncode == EXIT_REFUSED, refused.stderr
    assert "no such file or folder" in " ".join(refused.stderr.split()) and "Traceback" not in refused.stderr
    # Not found.
    assert allscore("status", "no-such-sample", env=env).returncode == EXIT_NOT_FOUND
    assert allscore("cancel", "--job", "no-such-job", env=env).returncode == EXIT_NOT_FOUND
    # Unreachable: a database nobody listens for.
    down = {**env, "ALLSCORE_DATABASE_URL": "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"}
    unreachable = allscore("status", "S-1", env=down)
    assert unreachable.returncode == EXIT_UNAVAILABLE, unreachable.stderr
    assert "could not be reached" in " ".join(unreachable.stderr.split()) and "Traceback" not in unreachable.stderr
    assert "secret" not in unreachable.stderr
