"""The task message contract: exactly {job_id, sample_id, image_uris, model_ref}, checked before any work."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from core.errors import AllscoreError
from worker.engine import ScoreRequest

FIELDS = ("job_id", "sample_id", "image_uris", "model_ref")
SAMPLE_ID_MAX = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidMessage(AllscoreError):
    """A task message that does not have the contract's shape."""


def check_identifier(value: object, what: str, limit: int = SAMPLE_ID_MAX) -> str:
    """A non-empty printable id of at most `limit` characters."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessage(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise InvalidMessage(f"{what} {value[:20]!r}... is {len(value)} characters; the limit is {limit}")
    if _CONTROL.search(value):
        raise InvalidMessage(f"{what} {value!r} holds control characters; use printable characters only")
    return value


def parse_message(args: Sequence[Any], kwargs: Mapping[str, Any]) -> ScoreRequest:
    """Validate a message's arguments into a ScoreRequest, or raise InvalidMessage saying what is wrong."""
    if args:
        raise InvalidMessage(f"positional arguments are not accepted (got {len(args)}); send keyword arguments")
    keys = set(kwargs)
    if keys != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - keys), sorted(keys - set(FIELDS))
        raise InvalidMessage(f"message must carry exactly {', '.join(FIELDS)}; missing {missing}, unexpected {extra}")
    uris = kwargs["image_uris"]
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and u for u in uris):
        raise InvalidMessage("image_uris must be a non-empty list of strings")
    return ScoreRequest(
        job_id=check_identifier(kwargs["job_id"], "job_id"),
        sample_id=check_identifier(kwargs["sample_id"], "sample_id"),
        image_uris=tuple(uris),
        model_ref=check_identifier(kwargs["model_ref"], "model_ref", limit=1024),
    )
