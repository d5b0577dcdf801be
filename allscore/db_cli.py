"""`allscore db upgrade`: apply the database migrations (safe to run from several containers at once)."""

from __future__ import annotations

from typing import Annotated

import typer

db_app = typer.Typer(help="The results database.", no_args_is_help=True)


@db_app.command("upgrade")
def upgrade_cmd(
    url: Annotated[str | None, typer.Option(help="database URL; default ALLSCORE_DATABASE_URL")] = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Create or migrate the tables and the analyst views."""
    from db.migrate import current_revision, upgrade

    upgrade(url, revision)
    typer.echo(f"database at revision {current_revision(url)}")
