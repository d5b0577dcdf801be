"""The worker's health check for Docker and compose: `python -m worker.health` exits 0 while the worker in this
container is connected to the broker and consuming its queues, 1 otherwise.

It asks the worker's own /healthz (ALLSCORE_METRICS_PORT, on this host), which answers from the beat the consumer
records inside Celery's event loop (worker.celery_app.HealthBeat): no message is sent, no other worker is asked,
and only the standard library is imported. Kubernetes asks /healthz itself (an httpGet probe).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(port: int, timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, what the worker said) from http://127.0.0.1:port/healthz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as answer:
            return answer.status == 200, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        return False, f"no answer on port {port}: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    port = int(args[0]) if args else int(os.environ.get("ALLSCORE_METRICS_PORT") or 0)
    if not port:
        print("ALLSCORE_METRICS_PORT is not set: the worker serves no health endpoint", file=sys.stderr)
        return 1
    healthy, said = check(port)
    print(said, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
