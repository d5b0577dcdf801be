"""`allscore review` (the web app) and `allscore users add|list` (who may log in to it)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from core.console import stderr_console

users_app = typer.Typer(help="Users of the review app (`allscore review`).", no_args_is_help=True)
err = stderr_console()


def review_cmd(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    https_only: Annotated[
        bool, typer.Option("--https-only", help="session cookie only over HTTPS (behind a TLS proxy)")
    ] = False,
) -> None:
    """Serve the review web app: samples, their cells and fields, verdicts and sign-offs (login required)."""
    import uvicorn

    from allscore.review.app import create_app

    app = create_app(https_only=https_only)
    err.print(f"allscore review on http://{host}:{port}/ (users: `allscore users add NAME`)")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the user name to log in with")],
    read_only: Annotated[bool, typer.Option("--read-only", help="may look, may not record verdicts")] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from the first line of stdin")
    ] = False,
    replace: Annotated[bool, typer.Option("--replace", help="set a new password for an existing user")] = False,
) -> None:
    """Add a user of the review app; the password is asked for (or read from stdin) and stored hashed."""
    from allscore.review.auth import MIN_PASSWORD_LENGTH, hash_password
    from db import reviews
    from db.engine import make_engine, session_factory, transaction

    reviews.check_user_name(name)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise typer.BadParameter(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    engine = make_engine()
    try:
        with transaction(session_factory(engine)) as session:
            reviews.add_user(
                session=session,
                name=name,
                password_hash=hash_password(password),
                can_write=not read_only,
                replace=replace,
            )
    finally:
        engine.dispose()
    err.print(f"user {name} {'updated' if replace else 'added'}{' (read-only)' if read_only else ''}")


@users_app.command("list")
def users_list() -> None:
    """The users of the review app and whether they may write."""
    from sqlalchemy import select

    from db.engine import make_engine, session_factory
    from db.models import ReviewUser

    engine = make_engine()
    try:
        with session_factory(engine)() as session:
            for name, can_write in session.execute(
                select(ReviewUser.name, ReviewUser.can_write).order_by(ReviewUser.name)
            ):
                typer.echo(f"{name}\t{'reviewer' if can_write else 'read-only'}")
    finally:
        engine.dispose()
