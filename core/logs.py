"""Logging shared by every command: text or one JSON object per line, with the job and sample being worked on;
and TensorFlow's native start-up lines kept out of the log.

`ALLSCORE_LOG_FORMAT=json` makes every record one JSON object: `ts` (UTC, ISO 8601), `level`, `logger`, `message`,
`pid`, `process` (Celery's process name), `job_id` and `sample_id` while a sample is being scored (set by
`log_context`), and `exc` with the traceback of an exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("allscore_job_id", default=None)
_sample_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("allscore_sample_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_context(job_id: str | None, sample_id: str | None) -> Iterator[None]:
    """Records logged inside carry these ids (JSON logs: job_id, sample_id)."""
    job_token = _job_id.set(job_id)
    sample_token = _sample_id.set(sample_id)
    try:
        yield
    finally:
        _sample_id.reset(sample_token)
        _job_id.reset(job_token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "process": record.processName,
        }
        job_id, sample_id = _job_id.get(), _sample_id.get()
        if job_id is not None:
            entry["job_id"] = job_id
        if sample_id is not None:
            entry["sample_id"] = sample_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(fmt: str, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    """The formatter of ALLSCORE_LOG_FORMAT: `json`, or `text` with the given format string."""
    return JsonFormatter() if fmt == "json" else logging.Formatter(text_format)


def setup_logging(level: int | str, fmt: str = "text", text_format: str = TEXT_FORMAT) -> None:
    """One stderr handler on the root logger, in the given format (replaces any handler there)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# What TensorFlow's native code writes to stderr while it starts, before absl's logging is initialised (so
# TF_CPP_MIN_LOG_LEVEL does not reach it): CUDA probing on a machine without a GPU, oneDNN and CPU-feature notes.
_NATIVE_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations|cuda|cuInit|cuDNN|cuFFT|cuBLAS|TensorRT|"
    r"TF-TRT|cpu_feature_guard|To enable the following instructions|rebuild TensorFlow with the appropriate compiler",
    re.IGNORECASE,
)


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 inside, and pass on only the lines that are not
    TensorFlow's start-up noise (an unexpected native message still reaches the log)."""
    if not enabled:
        yield
        return
    # Native code writes to file descriptor 2 whatever sys.stderr is (in a Celery pool process it is a logging
    # proxy with no file descriptor at all).
    fd = 2
    try:
        os.fstat(fd)
    except OSError:  # no descriptor 2 at all: nothing to quiet
        yield
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines()
                if line.strip() and not _NATIVE_NOISE.search(line)
            ]
            if kept:
                os.write(fd, ("\n".join(kept) + "\n").encode())
