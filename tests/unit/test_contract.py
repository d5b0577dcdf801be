"""The task message contract (core.contract): what a client may send and what a worker refuses."""

from __future__ import annotations

from typing import Any

import pytest

from core.contract import DEFAULT_STORE, InvalidMessage, ScoreMessage, parse_message
from core.settings import Settings

GOOD: dict[str, Any] = {
    "job_id": "job-1",
    "sample_id": "SLIDE-0042",
    "image_uris": ["s3://lab/slide/cell_1.bmp", "/data/slide/cell_2.bmp"],
    "model_version": "allscore:20261126-120000",
    "model_store": "default",
    "submission": 3,
    "kind": "fields",
    "um_per_px": 0.25,
}


def test_a_message_survives_the_wire_and_keeps_every_field() -> None:
    message = ScoreMessage.model_validate(GOOD)
    assert parse_message((), message.to_kwargs()) == message
    assert message.image_uris == tuple(GOOD["image_uris"])
    assert (message.kind, message.um_per_px, message.submission) == ("fields", 0.25, 3)


def test_unknown_fields_are_ignored_for_rolling_upgrades() -> None:
    message = parse_message((), {**GOOD, "priority": "high", "added_in_v9": [1, 2]})
    assert message.sample_id == GOOD["sample_id"]


def test_a_message_from_an_older_client_is_read() -> None:
    old = {k: GOOD[k] for k in ("job_id", "sample_id", "image_uris")} | {"model_ref": GOOD["model_version"]}
    message = parse_message((), old)
    assert (message.model_version, message.model_store) == (GOOD["model_version"], DEFAULT_STORE)
    assert (message.submission, message.kind, message.um_per_px) == (None, "cells", None)


BAD: list[tuple[str, dict[str, Any], str, bool]] = [
    # what, change, error text, whether the sample can still be told (and so failed)
    ("a bare string of URIs", {"image_uris": "s3://lab/a.bmp"}, "image_uris", True),
    ("no URIs", {"image_uris": []}, "image_uris", True),
    ("a URI that is not a string", {"image_uris": [42]}, "image_uris", True),
    ("a NUL byte in a path", {"image_uris": ["/data/cell\x00.bmp"]}, "NUL", True),
    ("a lone surrogate in a path", {"image_uris": ["/data/\ud800.bmp"]}, "surrogate", True),
    ("a line break in a key", {"image_uris": ["s3://lab/a\n.bmp"]}, "control character", True),
    ("a store given as a path", {"model_store": "/etc"}, "model_store", True),
    ("a store given as a URI", {"model_store": "s3://attacker/models"}, "model_store", True),
    ("an unpinned model", {"model_version": "allscore@production"}, "model_version", False),
    ("a model given as a path", {"model_version": "/tmp/evil/model.keras"}, "model_version", False),
    ("a sample id over 128 characters", {"sample_id": "x" * 129}, "sample_id", False),
    ("a sample id with a line break", {"sample_id": "S1\r\n"}, "sample_id", False),
    ("a job id that is a number", {"job_id": 42}, "job_id", False),
    ("submission 0", {"submission": 0}, "submission", False),
    ("submission as text", {"submission": "3"}, "submission", False),
    ("an unknown kind", {"kind": "slides"}, "kind", True),
    ("a negative scale", {"um_per_px": -1.0}, "um_per_px", True),
]


@pytest.mark.parametrize(("what", "change", "field", "told"), BAD, ids=[case[0] for case in BAD])
def test_a_message_that_breaks_the_contract_is_refused(
    what: str, change: dict[str, Any], field: str, told: bool
) -> None:
    with pytest.raises(InvalidMessage, match=field) as caught:
        parse_message((), {**GOOD, **change})
    # A broken message whose ids are sound names its sample, so the worker can fail it instead of dropping it.
    assert (caught.value.key is not None) is told, what
    if told:
        assert caught.value.key == (GOOD["job_id"], GOOD["sample_id"], GOOD["model_version"], GOOD["submission"])


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(InvalidMessage, match="positional"):
        parse_message(("job-1", "S1"), {})


def test_settings_refuse_a_soft_time_limit_at_or_over_the_hard_one() -> None:
    with pytest.raises(ValueError, match="SOFT_TIME_LIMIT"):
        Settings(task_soft_time_limit=600, task_time_limit=600)


def test_settings_list_the_default_store_and_named_extra_stores(tmp_path: Any) -> None:
    settings = Settings(home=tmp_path, model_stores={"archive": "s3://old-models"})
    assert settings.stores() == {"default": str(tmp_path / "models"), "archive": "s3://old-models"}
    with pytest.raises(ValueError, match="store name"):
        Settings(home=tmp_path, model_stores={"../up": "/tmp"})


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:s3cr3t@redis:6379/0", "redis://:***@redis:6379/0"),
        ("postgresql+psycopg://allscore:pw@postgres:5432/db", "postgresql+psycopg://allscore:***@postgres:5432/db"),
        ("Error 111 connecting to redis://:pw@h:1. Refused.", "Error 111 connecting to redis://:***@h:1. Refused."),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("sqlite:////tmp/allscore.db", "sqlite:////tmp/allscore.db"),
    ],
)
def test_errors_never_print_a_password(text: str, shown: str) -> None:
    from core.settings import redact

    assert redact(text) == shown
