"""A task's soft time limit (SIGUSR1 from Celery's prefork pool) waits while the worker imports TensorFlow or loads
a model, and is raised right after: an import cut in the middle leaves half-imported modules behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from worker.context import soft_limit_waits


@pytest.fixture
def soft_limit_handler() -> Iterator[None]:
    def raise_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, raise_limit)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_soft_limit_inside_the_block_is_raised_after_it(soft_limit_handler: None) -> None:
    steps: list[str] = []
    with pytest.raises(SoftTimeLimitExceeded):
        with soft_limit_waits():
            os.kill(os.getpid(), signal.SIGUSR1)
            steps.append("import went on")  # the block ran to its end
            steps.append("model loaded")
        steps.append("after the block")  # never: the limit is raised as the block ends
    assert steps == ["import went on", "model loaded"]


def test_outside_the_block_the_limit_interrupts_at_once(soft_limit_handler: None) -> None:
    steps: list[str] = []
    with pytest.raises(SoftTimeLimitExceeded):
        os.kill(os.getpid(), signal.SIGUSR1)
        steps.append("went on")
    assert steps == []
    assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_IGN


def test_the_limit_waits_even_when_another_thread_takes_the_signal(soft_limit_handler: None) -> None:
    # A worker process has other threads (I/O pool, TensorFlow's): the kernel may hand them the signal.
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    steps: list[str] = []
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            with soft_limit_waits():
                signal.pthread_kill(other.ident or 0, signal.SIGUSR1)  # delivered to the other thread
                time.sleep(0.2)  # the main thread runs a pending handler in here, if it is to run one
                steps.append("import went on")
            steps.append("after the block")
    finally:
        stop.set()
        other.join()
    assert steps == ["import went on"]
