"""The review web app (Starlette + Jinja2, server-rendered, no JavaScript build).

Every route but /login needs a logged-in user (a signed session cookie); every POST carries the session's CSRF
token; read-only users see everything and can change nothing. Results are read through the analyst views; only the
review tables are written (db.reviews). Here: the routes and the app; what guards the routes is
allscore.review.guard's, the images they serve are made by allscore.review.pictures.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from allscore.review import auth, queries
from allscore.review.guard import LoginRequired, Refused, checked_form, refusals, safe_next, writer
from allscore.review.pictures import (
    find_manifest,
    histogram_svg,
    overlay_png,
    picture_bytes,
    picture_title,
    thumbnail_png,
)
from core.settings import Settings, get_settings
from db import reviews
from db.engine import make_engine, session_factory, transaction
from db.models import CORRECTED_CLASSES

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
SESSION_COOKIE = "allscore_review"
SESSION_MAX_AGE = 12 * 3600
SECRET_VARIABLE = "ALLSCORE_REVIEW_SECRET_KEY"
GALLERY_PAGE = 120
CLASS_LABELS = {"all": "ALL (blast)", "hem": "normal (hem)", "other": "other kind", "not_a_cell": "not a cell"}


@dataclass
class ReviewState:
    """What the request handlers share: settings, the session factory."""

    settings: Settings
    factory: sessionmaker[Session]

    def read(self, fn: Callable[[Session], Any]) -> Any:
        with self.factory() as session:
            return fn(session)

    def write(self, fn: Callable[[Session], Any]) -> Any:
        with transaction(self.factory) as session:
            return fn(session)


def _state(request: Request) -> ReviewState:
    state: ReviewState = request.app.state.review
    return state


def _render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    user = request.session.get(auth.USER_SESSION_KEY)
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "csrf_token": auth.csrf_token(request.session), "labels": CLASS_LABELS, **context},
        status_code=status_code,
    )


# --- login ---------------------------------------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    if request.method == "GET":
        return _render(request, "login.html", {"next": safe_next(request.query_params.get("next")), "error": ""})
    form = await checked_form(request)
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    found = await run_in_threadpool(_state(request).read, lambda s: reviews.get_user(session=s, name=name))
    stored = found[1] if found else auth.DUMMY_HASH
    ok = await run_in_threadpool(auth.verify_password, password, stored)
    if not (found and ok):
        log.warning("review: failed login for %r", name)
        context = {"next": safe_next(str(form.get("next", ""))), "error": "Wrong user name or password."}
        return _render(request, "login.html", context, status_code=401)
    reviewer = found[0]
    request.session.clear()  # a new session (and CSRF token) on login: no fixation
    request.session[auth.USER_SESSION_KEY] = {"name": reviewer.name, "can_write": reviewer.can_write}
    auth.csrf_token(request.session)
    return RedirectResponse(safe_next(str(form.get("next", ""))), status_code=303)


async def logout(request: Request) -> Response:
    await checked_form(request)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --- samples -------------------------------------------------------------------------------------------------


async def samples_page(request: Request) -> Response:
    f = queries.SampleFilter.from_query(request.query_params)

    def read(session: Session) -> tuple[queries.SamplePage, dict[str, list[str]]]:
        return queries.list_samples(session, f), queries.filter_choices(session)

    page, choices = await run_in_threadpool(_state(request).read, read)
    return _render(
        request,
        "samples.html",
        {
            "page": page,
            "f": f,
            "choices": choices,
            "sorts": {
                "fraction_desc": "ALL fraction, highest first",
                "fraction_asc": "ALL fraction, lowest first",
                "newest": "newest first",
                "sample": "sample id",
            },
            "link": lambda **kw: "/?" + urlencode(f.query(**kw)),
        },
    )


def _counted(cell: dict[str, Any]) -> bool:
    return not cell.get("field_uri") or (cell.get("cell_kind") == "lymphoid" and not cell.get("edge"))


async def sample_page(request: Request) -> Response:
    sample_id = request.query_params.get("id", "")
    model_version = request.query_params.get("model") or None
    try:
        gallery_page = max(1, int(request.query_params.get("cells_page", "1")))
    except ValueError:
        gallery_page = 1

    def read(session: Session) -> dict[str, Any] | None:
        sample = queries.sample_result(session, sample_id, model_version)
        if sample is None:
            return None
        mv = sample["model_version"]
        return {
            "sample": sample,
            "cells": queries.cells(session, sample_id, mv),
            "fields": queries.fields(session, sample_id, mv),
            "verdicts": reviews.verdicts(session=session, sample_id=sample_id, model_version=mv),
            "others": queries.other_versions(session, sample_id, mv),
            "threshold": queries.threshold(session, mv),
        }

    data = await run_in_threadpool(_state(request).read, read)
    if data is None:
        return _render(request, "missing.html", {"what": f"sample {sample_id!r}"}, status_code=404)
    sample, verdicts = data["sample"], data["verdicts"]
    scored = [c for c in data["cells"] if c["p_all"] is not None and _counted(c)]
    scored.sort(key=lambda c: (-c["p_all"], c["image_uri"]))
    unscored = [c for c in data["cells"] if c["p_all"] is None and _counted(c)]
    pages = max(1, math.ceil(len(scored) / GALLERY_PAGE))
    gallery_page = min(gallery_page, pages)
    shown = scored[(gallery_page - 1) * GALLERY_PAGE : gallery_page * GALLERY_PAGE]
    for n, c in enumerate(shown, start=(gallery_page - 1) * GALLERY_PAGE):
        c["n"] = n
        c["call"] = "all" if c["is_all"] else "hem"
        c["verdict"] = verdicts.get(c["image_uri"])
        c["thumb"] = "/thumb?" + urlencode({"id": sample_id, "model": sample["model_version"], "uri": c["image_uri"]})
    fields = _field_uris(data["fields"], data["cells"])
    base = {"id": sample_id, "model": sample["model_version"]}
    return _render(
        request,
        "sample.html",
        {
            "sample": sample,
            "cells": shown,
            "n_scored": len(scored),
            "unscored": unscored,
            "gallery_page": gallery_page,
            "gallery_pages": pages,
            "page_link": lambda n: "/sample?" + urlencode({**base, "cells_page": n}),
            "hist": histogram_svg([c["p_all"] for c in scored], data["threshold"]),
            "others": data["others"],
            "fields": [
                {
                    "uri": uri,
                    "url": "/overlay?" + urlencode({**base, "field": uri}),
                    "name": uri.rsplit("/", 1)[-1] + ("" if found else " (no white cell found)"),
                }
                for uri, found in fields
            ],
            "corrections": CORRECTED_CLASSES,
            "self_link": "/sample?" + urlencode({**base, "cells_page": gallery_page}),
            "sample_link": lambda mv: "/sample?" + urlencode({"id": sample_id, "model": mv}),
            "model_link": lambda mv: "/models/" + "/".join(mv.split(":", 1)),
        },
    )


def _field_uris(fields: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(field URI, white cells found) for each field that was read, in the order submitted; fields with no cell
    too. Results from before migration 0010 have no field rows: then the fields of the cells."""
    if fields:
        return [(f["field_uri"], int(f["n_found"])) for f in fields if not f.get("error")]
    counts: dict[str, int] = {}
    for c in cells:
        if c.get("field_uri"):
            counts[c["field_uri"]] = counts.get(c["field_uri"], 0) + 1
    return sorted(counts.items())


async def thumbnail(request: Request) -> Response:
    """A cell's thumbnail, read from the store; only URIs that are cells of the sample named are served."""
    q = request.query_params
    state = _state(request)
    cell = await run_in_threadpool(
        state.read, lambda s: queries.cell(s, q.get("id", ""), q.get("model", ""), q.get("uri", ""))
    )
    if cell is None:
        return PlainTextResponse("no such cell", status_code=404)
    try:
        png = await run_in_threadpool(thumbnail_png, state.settings, cell)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable image is a grey tile, not a failed page
        log.warning("review: thumbnail of %s: %s", cell["image_uri"], exc)
        return PlainTextResponse("image unavailable", status_code=404)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def overlay(request: Request) -> Response:
    """One field of a field sample with every cell found outlined by its call (worker.report.render_overlays)."""
    q = request.query_params
    state = _state(request)
    sample_id, model_version, field = q.get("id", ""), q.get("model", ""), q.get("field", "")

    def read(session: Session) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
        sample = queries.sample_result(session, sample_id, model_version)
        found = [c for c in queries.cells(session, sample_id, model_version) if c.get("field_uri") == field]
        rows = [f for f in queries.fields(session, sample_id, model_version) if f["field_uri"] == field]
        return sample, found, rows

    sample, found, rows = await run_in_threadpool(state.read, read)
    if sample is None or not (found or rows):  # only fields of the sample named are served
        return PlainTextResponse("no such field", status_code=404)
    png = await run_in_threadpool(overlay_png, state.settings, sample, found, rows)
    if png is None:
        return PlainTextResponse("field unavailable", status_code=404)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def record_verdict(request: Request) -> Response:
    form = await checked_form(request)
    user = writer(request)
    sample_id, model_version = str(form.get("id", "")), str(form.get("model", ""))
    image_uri = str(form.get("uri", ""))
    # The form holds an "agree" button and a "disagree..." menu under one name: the chosen one is not empty.
    choice = next((str(v) for v in form.getlist("verdict") if v), "")
    if choice != "agree" and choice != "clear" and choice not in CORRECTED_CLASSES:
        raise Refused(400, "choose agree, or the class the cell really is")

    def write(session: Session) -> None:
        if choice == "clear":
            reviews.clear_verdict(
                session=session, sample_id=sample_id, model_version=model_version, image_uri=image_uri
            )
            return
        agree = choice == "agree"
        reviews.record_verdict(
            session=session,
            sample_id=sample_id,
            model_version=model_version,
            image_uri=image_uri,
            agree=agree,
            corrected_class=None if agree else choice,
            reviewer=user["name"],
        )

    try:
        await run_in_threadpool(_state(request).write, write)
    except reviews.ReviewError as exc:
        raise Refused(400, str(exc)) from exc
    back = safe_next(str(form.get("back", "")) or "/sample?" + urlencode({"id": sample_id, "model": model_version}))
    return RedirectResponse(f"{back}#cell-{form.get('n', '')}", status_code=303)


async def record_signoff(request: Request) -> Response:
    form = await checked_form(request)
    user = writer(request)
    sample_id, model_version = str(form.get("id", "")), str(form.get("model", ""))
    comment = str(form.get("comment", "")).strip()
    try:
        await run_in_threadpool(
            _state(request).write,
            lambda s: reviews.sign_off(
                session=s, sample_id=sample_id, model_version=model_version, reviewer=user["name"], comment=comment
            ),
        )
    except reviews.ReviewError as exc:
        raise Refused(400, str(exc)) from exc
    return RedirectResponse("/sample?" + urlencode({"id": sample_id, "model": model_version}), status_code=303)


# --- models --------------------------------------------------------------------------------------------------


async def model_page(request: Request) -> Response:
    name, version = request.path_params["name"], request.path_params["version"]
    state = _state(request)
    try:
        found = await run_in_threadpool(find_manifest, state.settings, name, version)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read is said on the page
        log.warning("review: model %s:%s: %s", name, version, exc)
        found = None
    if found is None:
        return _render(request, "missing.html", {"what": f"model {name}:{version} in the model stores"}, 404)
    manifest = found[1]
    pictures = [
        {"file": p, "url": f"/models/{name}/{version}/pictures/{p}", "title": picture_title(p)}
        for p in manifest.report_pictures
    ]
    return _render(
        request,
        "model.html",
        {
            "m": manifest,
            "v": manifest.validation,
            "pictures": pictures,
            "manifest_json": manifest.model_dump_json(indent=2),
        },
    )


async def model_picture(request: Request) -> Response:
    p = request.path_params
    png = await run_in_threadpool(picture_bytes, _state(request).settings, p["name"], p["version"], p["file"])
    if png is None:
        return PlainTextResponse("no such picture", status_code=404)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


# --- the app -------------------------------------------------------------------------------------------------


def secret_key(explicit: str | None = None) -> str:
    """The key that signs session cookies: ALLSCORE_REVIEW_SECRET_KEY, else a random one for this process."""
    import os

    key = explicit or os.environ.get(SECRET_VARIABLE, "")
    if key:
        if len(key) < 32:
            raise ValueError(f"{SECRET_VARIABLE} must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return key
    log.warning("%s is not set: a random key is used, so sessions end when the server restarts", SECRET_VARIABLE)
    return secrets.token_urlsafe(48)


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    secret: str | None = None,
    https_only: bool = False,
    engine: Engine | None = None,
) -> Starlette:
    """The review app over the database at `database_url` (default: the settings' database_url)."""
    settings = settings or get_settings()
    engine = engine or make_engine(database_url, settings)
    routes = [
        Route("/login", refusals(login_page), methods=["GET", "POST"]),
        Route("/logout", refusals(logout), methods=["POST"]),
        Route("/", refusals(samples_page), methods=["GET"]),
        Route("/sample", refusals(sample_page), methods=["GET"]),
        Route("/thumb", refusals(thumbnail), methods=["GET"]),
        Route("/overlay", refusals(overlay), methods=["GET"]),
        Route("/verdict", refusals(record_verdict), methods=["POST"]),
        Route("/signoff", refusals(record_signoff), methods=["POST"]),
        Route("/models/{name}/{version}", refusals(model_page), methods=["GET"]),
        Route("/models/{name}/{version}/pictures/{file}", refusals(model_picture), methods=["GET"]),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=secret_key(secret),
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE,
            same_site="lax",
            https_only=https_only,
        ),
        Middleware(LoginRequired),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.review = ReviewState(settings=settings, factory=session_factory(engine))
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["pct"] = lambda v: "-" if v is None else f"{v:.1%}"
    templates.env.filters["num"] = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    templates.env.filters["when"] = lambda v: "-" if v is None else v.strftime("%Y-%m-%d %H:%M UTC")
    app.state.templates = templates
    return app
