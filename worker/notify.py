"""Completion callbacks: once every sample of a job has ended, one HTTP POST of the job's summary to the URL given
at submit (`allscore submit --notify URL`), signed, retried, and only to hosts the operator allows.

- Who sends: the worker that ends a job's last sample, or the sweeper for jobs ended by `allscore cancel` or by
  itself. A conditional UPDATE claims the notification (db.notifications.claim_notification), so a job is notified
  at most once however many workers finish at the same moment; what came of it is kept in jobs.notify_status.
- Where: only to a host in ALLSCORE_NOTIFY_HOSTS on the worker (host, or host:port), over http or https, and
  redirects are not followed: a submitter cannot make a worker POST anywhere else.
- Signature: header `X-Allscore-Signature: t=UNIX_SECONDS,v1=HEX`, HEX the HMAC-SHA256 under
  ALLSCORE_NOTIFY_SECRET of `UNIX_SECONDS.BODY`; `verify()` checks it. Without a secret nothing is sent.
- Retries: ALLSCORE_NOTIFY_ATTEMPTS tries, ALLSCORE_NOTIFY_BACKOFF seconds doubling between them, on a network
  error or a 5xx/429 answer; a 2xx ends it; any other answer is final.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from core.errors import AllscoreError
from core.settings import Settings
from db import notifications
from db.engine import transaction

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Allscore-Signature"
EVENT = "allscore.job.ended"


class NotifyRefused(AllscoreError):
    """A callback URL that may not be used: not http(s), or a host the operator has not allowed."""


def check_url(url: str, allowed_hosts: list[str]) -> None:
    """Raise NotifyRefused unless `url` is http(s) to a host (or host:port) in `allowed_hosts`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotifyRefused(f"callback URL {url!r}: give an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise NotifyRefused(f"callback URL {url!r}: credentials in the URL are not allowed")
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed = {h.lower() for h in allowed_hosts}
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise NotifyRefused(
            f"callback host {host}:{port} is not one the operator allows (ALLSCORE_NOTIFY_HOSTS: "
            f"{', '.join(sorted(allowed)) or 'none'})"
        )


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The signature header's value for `body`."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def verify(body: bytes, header: str, secret: str, tolerance: float = 300.0, now: float | None = None) -> bool:
    """Whether `header` signs `body` under `secret`, made within `tolerance` seconds of `now` (for receivers)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        stamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - stamp) > tolerance:
        return False
    expected = sign(body, secret, stamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def payload(job_id: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample["status"]] = counts.get(sample["status"], 0) + 1
    return {
        "event": EVENT,
        "job_id": job_id,
        "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": counts,
        "samples": samples,
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer, not a new destination


def post(url: str, body: bytes, settings: Settings, sleep: Callable[[float], None] = time.sleep) -> str:
    """POST `body` with retries; returns what came of it ("delivered: HTTP 200 after 2 tries", or why not)."""
    opener = urllib.request.build_opener(_NoRedirect)
    delay = settings.notify_backoff
    outcome = ""
    for attempt in range(1, settings.notify_attempts + 1):
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "allscore-notify",
                SIGNATURE_HEADER: sign(body, settings.notify_secret),
            },
        )
        try:
            with opener.open(request, timeout=settings.notify_timeout) as answer:
                return f"delivered: HTTP {answer.status} after {attempt} tries"
        except urllib.error.HTTPError as exc:
            outcome = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code != 429:
                return f"refused by the receiver: {outcome} after {attempt} tries"
        except OSError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        if attempt < settings.notify_attempts:
            log.warning("callback to %s: try %d failed (%s); again in %.1fs", url, attempt, outcome, delay)
            sleep(delay)
            delay *= 2
    return f"not delivered after {settings.notify_attempts} tries: {outcome}"


def notify_job(job_id: str, sessions: sessionmaker[Session], settings: Settings) -> str | None:
    """Send the job's callback if it is due and this caller wins the claim; returns what came of it (None: not due)."""
    with transaction(sessions) as session:
        url = notifications.claim_notification(session=session, job_id=job_id)
        if url is None:
            return None
        samples = notifications.job_summary(session=session, job_id=job_id)
    try:
        check_url(url, settings.notify_hosts)
        if not settings.notify_secret:
            raise NotifyRefused("ALLSCORE_NOTIFY_SECRET is not set on the worker: callbacks are not sent unsigned")
    except NotifyRefused as exc:
        status = f"not sent: {exc}"
    else:
        body = json.dumps(payload(job_id, samples), default=str).encode()
        status = post(url, body, settings)
    (log.info if status.startswith("delivered") else log.error)("job %s callback to %s: %s", job_id, url, status)
    with transaction(sessions) as session:
        notifications.record_notification(session=session, job_id=job_id, status=status)
    return status


def notify_in_background(job_id: str, sessions: sessionmaker[Session], settings: Settings) -> threading.Thread:
    """notify_job in a daemon thread, so that retries never hold up the next sample."""

    def run() -> None:
        try:
            notify_job(job_id, sessions, settings)
        except Exception:  # a callback must never take the worker down
            log.exception("job %s: the callback failed", job_id)

    thread = threading.Thread(target=run, name=f"allscore-notify-{job_id[:12]}", daemon=True)
    thread.start()
    return thread
