"""The review app as its users meet it: in Debian's Chromium (headless, driven by Playwright, no browser download),
over samples a real worker scored into PostgreSQL, served by `allscore review` in its own process.

Screenshots of every page are written under the test's tmp folder and copied to /tmp/review-shots/.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from core.artifact import Registry
from core.settings import reset_settings_cache
from db.engine import make_engine
from db.migrate import upgrade
from tests.fixtures import PublishedModel
from tests.harness.review_site import (
    CHROMIUM,
    PASSWORDS,
    ReviewServer,
    csrf_of,
    keep_screenshot,
    login,
    run_cli,
    unique_queue,
)
from tests.harness.services import local_redis_url, throwaway_database
from tests.helpers import CNMC_SAMPLE, REPO_ROOT, cnmc_cells, require_service
from tests.worker_process import WorkerProcess
from worker.cli import wait_for_job
from worker.client import submit_sample, submit_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELLS = 24
FRACTIONS = {"SLIDE-HIGH": 0.6, "SLIDE-MID": 0.25, "SLIDE-CLEAN": 0.0}


@dataclass
class Site:
    url: str
    db_url: str
    model: PublishedModel
    other_version: str
    server: ReviewServer


@pytest.fixture(scope="module")
def site(pg_admin_url: str, tiny_model: PublishedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Four slides (three synthetic, the real C-NMC cells) and a slide of unreadable files, scored by a real worker
    with the tiny model, one of them also by a second version; `allscore review` serving them; two users."""
    require_service("Chromium", os.path.exists(CHROMIUM), f"{CHROMIUM} missing: apt-get install chromium")
    redis_url = local_redis_url()
    tmp = tmp_path_factory.mktemp("review")
    with throwaway_database(pg_admin_url) as db_url:
        upgrade(db_url)
        # The same model published again as a second version: the sample page lists the other version's result.
        model_file, manifest = Registry(tiny_model.store).fetch(tiny_model.ref)
        other = manifest.model_copy(update={"version": "v2-review"})
        Registry(tiny_model.store).publish(model_file, other)
        env = {
            "ALLSCORE_HOME": str(tmp / "home"),
            "ALLSCORE_DATABASE_URL": db_url,
            "ALLSCORE_BROKER_URL": redis_url,
            "ALLSCORE_QUEUE": unique_queue(),
            "ALLSCORE_MODEL_STORE": tiny_model.store,
            "ALLSCORE_BATCH_SIZE": "16",
            "ALLSCORE_LOW_COUNT": "0",  # flags from the fractions only
            "ALLSCORE_REVIEW_SECRET_KEY": "k" * 16 + uuid.uuid4().hex,
        }
        worker = WorkerProcess(env, tmp / "worker.log", concurrency=1)
        server = ReviewServer(env, tmp / "review.log")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            reset_settings_cache()
            from trainer.synth import write_sample

            samples = {}
            for i, (sample, fraction) in enumerate(FRACTIONS.items()):
                write_sample(tmp / "slides" / sample, CELLS, fraction, seed=10 + i)
                samples[sample] = [str(tmp / "slides" / sample)]
            cnmc_cells()
            samples["SLIDE-CNMC"] = [str(CNMC_SAMPLE)]
            (tmp / "slides" / "SLIDE-BROKEN").mkdir()
            (tmp / "slides" / "SLIDE-BROKEN" / "empty.bmp").write_bytes(b"")
            samples["SLIDE-BROKEN"] = [str(tmp / "slides" / "SLIDE-BROKEN")]
            try:
                worker.start(timeout=120)
                job = submit_samples(samples, model_ref=tiny_model.ref)
                rows = wait_for_job(job, len(samples), timeout=300)
                assert {r["status"] for r in rows} == {"done"}, rows
                job2 = submit_sample("SLIDE-HIGH", samples["SLIDE-HIGH"], model_ref=other.ref)
                assert wait_for_job(job2, 1, timeout=120)[0]["status"] == "done"
                # A field sample: two real BCCD fields, in which the worker finds the white cells.
                fields = tmp / "slides" / "SLIDE-FIELDS"
                fields.mkdir()
                for jpg in sorted((REPO_ROOT / "tests" / "data" / "bccd" / "JPEGImages").glob("*.jpg"))[:2]:
                    shutil.copy(jpg, fields / jpg.name)
                job3 = submit_sample("SLIDE-FIELDS", [str(fields)], model_ref=tiny_model.ref, kind="fields")
                assert wait_for_job(job3, 1, timeout=240)[0]["status"] == "done"
                worker.stop()
                run_cli(["users", "add", "alice", "--password-stdin"], env, stdin=PASSWORDS["alice"] + "\n")
                run_cli(["users", "add", "viewer", "--read-only", "--password-stdin"], env, PASSWORDS["viewer"] + "\n")
                server.start()
                yield Site(url=server.url, db_url=db_url, model=tiny_model, other_version=other.ref, server=server)
            finally:
                worker.stop()
                server.stop()
                reset_settings_cache()


def _query(db_url: str, sql: str, **params: object) -> list[dict[str, object]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def test_a_reviewer_reviews_a_flagged_sample_in_a_browser(site: Site, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "shots"
    shots.mkdir()

    def shot(page: object, name: str) -> None:
        path = shots / name
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        keep_screenshot(path)

    flagged = {
        r["sample_id"]
        for r in _query(
            site.db_url, "SELECT sample_id, flags FROM sample_results WHERE model_version = :m", m=site.model.ref
        )
        if r["flags"]
    }
    assert flagged, "the tiny model flagged none of the slides; the filter would show nothing"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # Nothing without a login: the samples page sends the browser to the login form.
        page.goto(site.url + "/")
        expect(page).to_have_url(site.url + "/login?next=%2F")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", "wrong password")
        page.click("button[type=submit]")
        expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", PASSWORDS["alice"])
        shot(page, "01_login.png")
        page.click("button[type=submit]")
        expect(page.locator("h1")).to_have_text("Samples")
        shot(page, "02_samples.png")
        # + CNMC, BROKEN, FIELDS, and HIGH under v2
        assert page.locator("#samples tbody tr").count() == len(FRACTIONS) + 4

        # Filter to the flagged samples: exactly the flagged ones are listed, highest ALL fraction first.
        page.select_option("select[name=flag]", "any")
        page.click("form.filters button[type=submit]")
        rows = page.locator("#samples tbody tr")
        listed = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]
        expected = {
            r["sample_id"] for r in _query(site.db_url, "SELECT sample_id FROM sample_results WHERE flags <> ''")
        }
        assert set(listed) == expected and "SLIDE-BROKEN" not in listed
        assert len(listed) == len(_query(site.db_url, "SELECT 1 FROM sample_results WHERE flags <> ''"))
        shot(page, "03_samples_flagged.png")

        # Open the flagged sample with the highest fraction under the tiny model.
        first = page.locator("#samples tbody tr", has_text=site.model.ref).first
        sample_id = first.locator("td").first.inner_text()
        first.locator("td a").first.click()
        expect(page.locator("h1")).to_contain_text(f"Sample {sample_id}")
        (row,) = _query(
            site.db_url,
            "SELECT n_cells, n_failed, n_all FROM sample_results WHERE sample_id = :s AND model_version = :m",
            s=sample_id,
            m=site.model.ref,
        )
        n_scored = int(row["n_cells"]) - int(row["n_failed"])  # type: ignore[call-overload]
        tiles = page.locator("#gallery .tile")
        assert tiles.count() == n_scored
        # The thumbnails come from the store: each loads as a 96-pixel picture once scrolled into view.
        page.locator("#gallery").scroll_into_view_if_needed()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#gallery img')].slice(0, 6)"
            ".every(i => i.complete && i.naturalWidth === 96)"
        )
        # The gallery is sorted by p(ALL), highest first, and framed by the call.
        ps = [float(t.split("=")[1]) for t in page.locator("#gallery .tile .p").all_inner_texts()]
        assert ps == sorted(ps, reverse=True)
        assert page.locator("#gallery .tile.call-all").count() == row["n_all"]
        # The histogram: 20 bars holding every scored cell, and the threshold drawn.
        assert page.locator("#histogram rect.bar").count() == 20
        # (a vertical line has no width, so Playwright calls it hidden: its place and label are checked instead)
        threshold = site.model.manifest.threshold
        expect(page.locator("#histogram")).to_contain_text(f"threshold {threshold:.2f}")
        x = float(page.locator("#histogram #threshold").get_attribute("x1") or "nan")
        bars = page.locator("#histogram rect.bar")
        left, right = float(bars.nth(0).get_attribute("x") or 0), float(bars.nth(19).get_attribute("x") or 0)
        step = (right - left) / 19
        assert x == pytest.approx(left + 20 * step * threshold, abs=1.0)
        assert page.locator("#others tbody tr").count() == (1 if sample_id == "SLIDE-HIGH" else 0)
        shot(page, "04_sample.png")

        # Verdicts: the top cell is corrected to "normal (hem)" (or to ALL when the model called it normal), the
        # second is agreed with; then the sample is signed off with a comment.
        top, second = tiles.nth(0), tiles.nth(1)
        top_uri, second_uri = top.get_attribute("data-uri"), second.get_attribute("data-uri")
        top_called_all = "call-all" in (top.get_attribute("class") or "")
        top.locator("select[name=verdict]").select_option("hem" if top_called_all else "all")
        page.wait_for_load_state()
        expect(page.locator("#cell-0 .verdict")).to_contain_text("(alice)")
        tiles.nth(1).locator("button[value=agree]").click()
        page.wait_for_load_state()
        expect(page.locator("#cell-1 .verdict")).to_have_text("agreed (alice)")
        page.fill("#signoff textarea[name=comment]", "Blasts confirmed on review; one cell corrected.")
        page.click("#signoff button[type=submit]")
        page.wait_for_load_state()

        # Reload: everything is still there, and the reviewed fraction applies the correction.
        page.reload()
        expect(page.locator("#cell-0 .verdict")).to_have_text(
            ("→ normal (hem)" if top_called_all else "→ ALL (blast)") + " (alice)"
        )
        expect(page.locator("#cell-1 .verdict")).to_have_text("agreed (alice)")
        expect(page.locator("#signoff-record")).to_contain_text("Signed off by alice")
        expect(page.locator("#signoff-record")).to_contain_text("Blasts confirmed on review; one cell corrected.")
        n_all = int(row["n_all"]) + (-1 if top_called_all else 1)  # type: ignore[call-overload]
        expect(page.locator("#reviewed .big")).to_have_text(f"{n_all / n_scored:.1%}")
        expect(page.locator("#reviewed")).to_contain_text(f"2 of {n_scored} cells reviewed: 1 agreed, 1 corrected")
        shot(page, "05_sample_reviewed.png")

        # The samples page shows the sign-off; the model page shows the manifest and the training pictures.
        page.goto(site.url + "/?flag=any")
        signed = page.locator("#samples tbody tr", has_text=sample_id).filter(has_text=site.model.ref)
        expect(signed.locator(".state")).to_have_text("signed off")
        page.goto(site.url + "/models/" + site.model.ref.replace(":", "/"))
        expect(page.locator("h1")).to_have_text(f"Model {site.model.ref}")
        expect(page.locator("#manifest")).to_contain_text('"threshold"')
        pictures = page.locator(".pictures img")
        assert pictures.count() == 4
        page.wait_for_function(
            "() => [...document.querySelectorAll('.pictures img')].every(i => i.complete && i.naturalWidth > 200)"
        )
        shot(page, "06_model.png")

        # A field sample shows each field with its cells outlined, read from the store.
        page.goto(site.url + "/sample?id=SLIDE-FIELDS")
        expect(page.locator("h1")).to_contain_text("Sample SLIDE-FIELDS")
        assert page.locator(".fields img").count() == 2
        page.locator(".fields").scroll_into_view_if_needed()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.fields img')].every(i => i.complete && i.naturalWidth >= 640)",
            timeout=60_000,
        )
        shot(page, "07_field_sample.png")

        # Log out: the session ends, and the pages are behind the login again.
        page.click("header button[type=submit]")
        expect(page.locator("h1")).to_have_text("Log in")
        page.goto(site.url + f"/sample?id={sample_id}")
        expect(page.locator("h1")).to_have_text("Log in")
        browser.close()

    verdicts = _query(
        site.db_url,
        "SELECT sample_id, model_version, image_uri, agree, corrected_class, reviewer FROM cell_verdicts "
        "ORDER BY agree",
    )
    assert verdicts == [
        {
            "sample_id": sample_id,
            "model_version": site.model.ref,
            "image_uri": top_uri,
            "agree": False,
            "corrected_class": "hem" if top_called_all else "all",
            "reviewer": "alice",
        },
        {
            "sample_id": sample_id,
            "model_version": site.model.ref,
            "image_uri": second_uri,
            "agree": True,
            "corrected_class": None,
            "reviewer": "alice",
        },
    ]


def test_requests_without_a_session_or_with_a_bad_csrf_token_are_refused(site: Site) -> None:
    with httpx.Client(base_url=site.url, follow_redirects=False, timeout=30) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        for path in (
            "/thumb?id=SLIDE-HIGH&model=x&uri=y",
            "/overlay?id=SLIDE-HIGH",
            "/models/tiny/v1/pictures/roc.png",
        ):
            assert anonymous.get(path).status_code == 401, path
        refused = anonymous.post(
            "/signoff", data={"id": "SLIDE-HIGH", "model": site.model.ref, "comment": "x", "csrf_token": "x"}
        )
        assert refused.status_code == 401
        # The login form itself needs its token.
        assert anonymous.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]}).status_code == 403

    with httpx.Client(base_url=site.url, follow_redirects=False, timeout=30) as alice:
        assert login(alice, "alice", PASSWORDS["alice"]).status_code == 303
        page = alice.get("/sample", params={"id": "SLIDE-MID", "model": site.model.ref})
        token = csrf_of(page.text)
        uri = _query(
            site.db_url,
            "SELECT image_uri FROM cell_results WHERE sample_id = 'SLIDE-MID' AND p_all IS NOT NULL LIMIT 1",
        )[0]["image_uri"]
        verdict = {"id": "SLIDE-MID", "model": site.model.ref, "uri": uri, "verdict": "agree"}
        signoff = {"id": "SLIDE-MID", "model": site.model.ref, "comment": "forged"}
        for path, form in (("/verdict", verdict), ("/signoff", signoff), ("/logout", {})):
            for bad in ({}, {"csrf_token": "forged"}, {"csrf_token": token[:-1]}):
                answer = alice.post(path, data={**form, **bad})
                assert answer.status_code == 403, (path, bad, answer.text)
        assert not _query(site.db_url, "SELECT 1 FROM cell_verdicts WHERE sample_id = 'SLIDE-MID'")
        assert not _query(site.db_url, "SELECT 1 FROM sample_signoffs WHERE sample_id = 'SLIDE-MID'")
        # Still logged in (the forged logouts did nothing); the thumbnail route serves cells of the sample only.
        thumb = alice.get("/thumb", params={"id": "SLIDE-MID", "model": site.model.ref, "uri": uri})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        outside = alice.get("/thumb", params={"id": "SLIDE-MID", "model": site.model.ref, "uri": "/etc/passwd"})
        assert outside.status_code == 404
        # With the token, the same verdict is taken.
        assert alice.post("/verdict", data={**verdict, "csrf_token": token}).status_code == 303
        assert len(_query(site.db_url, "SELECT 1 FROM cell_verdicts WHERE sample_id = 'SLIDE-MID'")) == 1

    with httpx.Client(base_url=site.url, follow_redirects=False, timeout=30) as viewer:
        assert login(viewer, "viewer", PASSWORDS["viewer"]).status_code == 303
        page = viewer.get("/sample", params={"id": "SLIDE-CLEAN", "model": site.model.ref})
        assert page.status_code == 200 and 'action="/verdict"' not in page.text and 'id="signoff"' not in page.text
        answer = viewer.post(
            "/signoff",
            data={"id": "SLIDE-CLEAN", "model": site.model.ref, "comment": "x", "csrf_token": csrf_of(page.text)},
        )
        assert answer.status_code == 403
        assert not _query(site.db_url, "SELECT 1 FROM sample_signoffs WHERE sample_id = 'SLIDE-CLEAN'")
