"""A review deployment on this machine for the browser tests: samples scored by a real worker into PostgreSQL, the
review app running as `allscore review` in its own process, and users made with `allscore users add`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.harness.cli import run_allscore
from tests.harness.faults import free_port
from tests.helpers import stop_process_group

SCREENSHOTS = Path("/tmp/review-shots")
CHROMIUM = "/usr/bin/chromium"
PASSWORDS = {"alice": "alice-password-1", "viewer": "viewer-password-1"}


def run_cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run `allscore ARGS` as a user would, failing with its output if it fails."""
    return run_allscore(*args, env=env, stdin=stdin, timeout=120)


@dataclass
class ReviewServer:
    """`allscore review` in a subprocess on a free port."""

    env: dict[str, str]
    log_path: Path
    # The service's command (e.g. the compose file's); its host and port are replaced by 127.0.0.1 and a free port.
    command: list[str] | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # The interpreter of the install under test (another venv's), run in `cwd` when given.
    python: str = sys.executable
    cwd: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ReviewServer:
        log = self.log_path.open("ab")
        args = list(self.command or ["review", "--host", "127.0.0.1", "--port", "8080"])
        args[args.index("--host") + 1] = "127.0.0.1"
        args[args.index("--port") + 1] = str(self.port)
        self.proc = subprocess.Popen(
            [self.python, "-m", "allscore", *args],
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"allscore review exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/login", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError(f"allscore review did not answer after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=10)


def login(client: httpx.Client, name: str, password: str) -> httpx.Response:
    """Log in through the login form (reading its CSRF token first); returns the answer to the POST."""
    page = client.get("/login")
    token = csrf_of(page.text)
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token, "next": "/"})


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def keep_screenshot(path: Path) -> Path:
    """Copy a screenshot the test took to /tmp/review-shots/ for people to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    return path


def unique_queue() -> str:
    return f"allscore-review-{uuid.uuid4().hex[:8]}"
