"""Run a real `allscore worker` (Celery, prefork) as a subprocess for the integration tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.helpers import stop_process_group


class WorkerProcess:
    """A real worker subprocess with its own log file; stop() sends SIGTERM (warm shutdown)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 2,
        pool: str = "prefork",
        *,
        python: str = sys.executable,
        cwd: Path | None = None,
    ) -> None:
        """`python`: the interpreter of the install under test (another venv's), run in `cwd` when given."""
        self.log_path = log_path
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.cwd = cwd
        self.cmd = [
            python,
            "-m",
            "allscore",
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until Celery says it is ready."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def model_loads(self) -> Counter[str]:
        """How many times each worker process (pid) loaded a model, from the log."""
        return Counter(re.findall(r"model loaded: \S+ in pid (\d+)", self.log()))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole group if it hangs."""
        if self.proc is None:
            return
        stop_process_group(self.proc, timeout)  # nothing to signal if it already exited; its log still closes
        self._log.close()
