"""What stands between a request and the review app's handlers: no page without a logged-in user (LoginRequired),
forms only with the session's CSRF token, writes only by users who may write, refusals answered as plain-text
errors, and redirects only within the site.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from allscore.review import auth

PUBLIC_PATHS = ("/login", "/favicon.ico")


class LoginRequired:
    """Nothing is served without a logged-in user: pages redirect to /login, everything else gets 401."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        session = scope.get("session") or {}
        if isinstance(session.get(auth.USER_SESSION_KEY), dict):
            await self.app(scope, receive, send)
            return
        response: Response
        path = scope["path"]
        page = path in ("/", "/sample") or (path.startswith("/models/") and "/pictures/" not in path)
        if scope["method"] == "GET" and page:
            target = path + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
            response = RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        else:
            response = PlainTextResponse("login required", status_code=401)
        await response(scope, receive, send)


def _user(request: Request) -> dict[str, Any]:
    user = request.session.get(auth.USER_SESSION_KEY)
    assert isinstance(user, dict)  # LoginRequired let the request through
    return user


async def checked_form(request: Request) -> FormData:
    """The form, if it carries the session's CSRF token; else a 403 is raised."""
    form = await request.form()
    if not auth.csrf_ok(request.session, form.get(auth.CSRF_FIELD)):
        raise Refused(403, "the form's CSRF token is missing or wrong; reload the page and try again")
    return form


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def safe_next(target: str | None) -> str:
    # Only a path of this site: never //host or a scheme (an open redirect).
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def writer(request: Request) -> dict[str, Any]:
    user = _user(request)
    if not user.get("can_write"):
        raise Refused(403, f"user {user['name']!r} is read-only")
    return user


def refusals(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Refused as exc:
            return PlainTextResponse(exc.message, status_code=exc.status)

    return wrapped
