"""JSON log lines and the quieting of TensorFlow's native start-up lines (core.logs)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from core.logs import JsonFormatter, log_context


def _record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("worker.tasks", logging.WARNING, __file__, 1, message, ("x",), exc_info)


def test_json_lines_carry_the_job_and_sample_only_inside_their_context() -> None:
    formatter = JsonFormatter()
    with log_context("job-1", "SLIDE-7"):
        inside = json.loads(formatter.format(_record("sample %s: ünïcode", exc=True)))
    outside = json.loads(formatter.format(_record("after %s")))
    assert inside["message"] == "sample x: ünïcode" and inside["level"] == "WARNING"
    assert (inside["job_id"], inside["sample_id"]) == ("job-1", "SLIDE-7")
    assert inside["logger"] == "worker.tasks" and inside["pid"] == os.getpid()
    assert "ValueError: boom" in inside["exc"]
    assert inside["ts"].endswith("+00:00")
    assert "job_id" not in outside and "sample_id" not in outside and "exc" not in outside


def _stderr_lines_of(script: str) -> list[str]:
    """What a Python process running `script` writes to its standard error (it must exit 0)."""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stderr.splitlines()


def test_native_start_up_noise_is_dropped_and_other_native_lines_kept() -> None:
    script = (
        "import os\n"
        "from core.logs import quiet_native_stderr\n"
        "with quiet_native_stderr():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written\\n')\n"
        "    os.write(2, b'E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n')\n"
        "    os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'F0000 something else broke\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    assert _stderr_lines_of(script) == ["F0000 something else broke", "after"]


def test_native_noise_is_dropped_when_sys_stderr_has_no_descriptor() -> None:
    # In a Celery pool process sys.stderr is a logging proxy without fileno(); native code still writes to fd 2.
    script = (
        "import os, sys\n"
        "class Proxy:\n"
        "    def write(self, text): pass\n"
        "    def flush(self): pass\n"
        "sys.stderr = Proxy()\n"
        "from core.logs import quiet_native_stderr\n"
        "with quiet_native_stderr():\n"
        "    os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'F0000 kept\\n')\n"
    )
    assert _stderr_lines_of(script) == ["F0000 kept"]
