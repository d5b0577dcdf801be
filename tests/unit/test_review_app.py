"""The review app's samples list over SQLite, through Starlette's test client: filters, sort and paging as a
reviewer uses them (the browser tests in tests/integration/test_review_browser.py drive the whole app)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from allscore.review.app import create_app
from allscore.review.auth import hash_password, verify_password
from db import reviews
from db.engine import make_engine, session_factory, transaction
from db.migrate import upgrade
from tests.harness.db import make_cells, score, submit

N_SAMPLES = 30


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    url = f"sqlite:///{tmp_path / 'review.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    # Sample i has i ALL calls out of 40: fractions 0 to 0.725; flags over_5pct/over_20pct from the helper.
    for i in range(N_SAMPLES):
        job = "job-even" if i % 2 == 0 else "job-odd"
        submit(factory, f"{job}-{i}", [f"S{i:02d}"], "cnn:1")
        score(factory, f"S{i:02d}", "cnn:1", make_cells(f"/slides/S{i:02d}", [0.9] * i + [0.1] * (40 - i)))
    with transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash=hash_password("ann-password"), can_write=True)
    engine.dispose()
    client = TestClient(create_app(database_url=url, secret="s" * 40), follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    answer = client.post("/login", data={"name": "ann", "password": "ann-password", "csrf_token": token.group(1)})
    assert answer.status_code == 303
    return client


def listed(client: TestClient, **params: str) -> list[str]:
    page = client.get("/", params=params)
    assert page.status_code == 200
    return re.findall(r'<a href="/sample\?id=(S\d\d)&amp;', page.text)


def test_filters_sort_and_paging(client: TestClient) -> None:
    # Default: highest ALL fraction first, 25 a page.
    assert listed(client) == [f"S{i:02d}" for i in range(29, 4, -1)]
    assert listed(client, page="2") == [f"S{i:02d}" for i in range(4, -1, -1)]
    assert listed(client, sort="fraction_asc")[:3] == ["S00", "S01", "S02"]
    # Flags: over_20pct means more than 8 of 40 cells; "none" means no flag at all (fraction <= 5%: 0, 1, 2 cells).
    assert sorted(listed(client, flag="over_20pct", sort="sample")) == [f"S{i:02d}" for i in range(9, 30)][:25]
    assert sorted(listed(client, flag="none")) == ["S00", "S01", "S02"]
    assert len(listed(client, flag="over_5pct", page="2")) == 27 - 25
    # Job, model version, status and dates.
    assert listed(client, job="job-odd-7") == ["S07"]
    assert listed(client, model="cnn:2") == []
    assert len(listed(client, model="cnn:1", status="done", page="2")) == 5
    today = datetime.now(UTC).date()
    assert len(listed(client, **{"from": today.isoformat(), "page": "2"})) == 5
    assert listed(client, **{"from": (today + timedelta(days=1)).isoformat()}) == []
    assert listed(client, to=(today - timedelta(days=1)).isoformat()) == []


def test_sample_page_and_missing_sample(client: TestClient) -> None:
    page = client.get("/sample", params={"id": "S12"})
    assert page.status_code == 200
    assert "12 ALL of 40 scored cells" in page.text
    assert page.text.count('class="tile call-all"') == 12 and page.text.count('class="tile call-hem"') == 28
    assert client.get("/sample", params={"id": "S99"}).status_code == 404


def test_passwords_are_salted_scrypt_hashes() -> None:
    one, two = hash_password("correct horse"), hash_password("correct horse")
    assert one != two and one.startswith("scrypt$") and "correct" not in one
    assert verify_password("correct horse", one) and verify_password("correct horse", two)
    assert not verify_password("correct hors", one)
    assert not verify_password("correct horse", "garbage")
    with pytest.raises(ValueError):
        hash_password("short")
