"""The command line: one Typer app composed of the commands each component exports."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from allscore.db_cli import db_app
from allscore.export_reviewed import export_reviewed_cmd
from allscore.review.cli import review_cmd, users_app
from allscore.segment_cli import segment_cmd
from allscore.store_cli import store_app
from core.errors import EXIT_REFUSED, EXIT_UNAVAILABLE, AllscoreError
from core.settings import redact
from trainer.cli import data_app, evaluate_cmd, models_app, train_cmd
from worker.cli import cancel_cmd, report_cmd, status_cmd, submit_cmd, sweep_cmd, worker_cmd

app = typer.Typer(
    name="allscore",
    help="Score single-cell microscopy images for Acute Lymphoblastic Leukemia (ALL).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
# export-reviewed reads the database, which the trainer (data_app's home) never imports: it is added here.
data_app.command("export-reviewed")(export_reviewed_cmd)
app.add_typer(models_app, name="models")
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)
app.add_typer(db_app, name="db")
app.add_typer(store_app, name="store")
app.command("worker")(worker_cmd)
app.command("submit")(submit_cmd)
app.command("status")(status_cmd)
app.command("cancel")(cancel_cmd)
app.command("report")(report_cmd)
app.command("segment")(segment_cmd)
app.command("sweep")(sweep_cmd)
app.command("review")(review_cmd)
app.add_typer(users_app, name="users")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"allscore {version('allscore')}")
        except PackageNotFoundError:  # a source tree that was never installed
            typer.echo("allscore (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level"),
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print allscore's version and exit"
    ),
) -> None:
    from core.logs import setup_logging
    from core.settings import get_settings

    try:
        fmt = get_settings().log_format
    except ValueError:  # settings that do not load are reported by the command that reads them
        fmt = "text"
    level = logging.INFO if verbose else logging.WARNING
    if fmt == "json":
        setup_logging(level, "json")
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Exceptions of the database, broker and network clients that mean "could not reach the service", by class name
# along their MRO (sqlalchemy.exc.OperationalError, kombu's and redis's connection errors, OSError's own).
_UNREACHABLE = {"OperationalError", "ConnectionError", "TimeoutError", "ConnectionRefusedError"}


def _unreachable(exc: BaseException) -> bool:
    return any(cls.__name__ in _UNREACHABLE for cls in type(exc).__mro__)


def main() -> None:
    """Entry point: run the app; errors a user can meet print one clear line and exit with their status:
    2 usage (Click's), 3 refused, 4 not found, 5 a service unreachable (README, "Exit codes")."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    console = Console(stderr=True)
    try:
        app()
    except AllscoreError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(getattr(exc, "exit_code", EXIT_REFUSED))
    except Exception as exc:
        if not _unreachable(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        console.print(
            f"[bold red]error:[/] a service could not be reached ({type(exc).__name__}: {redact(first)}); check "
            "ALLSCORE_DATABASE_URL, ALLSCORE_BROKER_URL and ALLSCORE_S3_ENDPOINT_URL, and that the servers are up",
            highlight=False,
        )
        sys.exit(EXIT_UNAVAILABLE)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path(".demo"), help="folder for the demo's data, models, database, montages"),
    epochs: int = typer.Option(30, help="maximum training epochs"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the folder first"),
) -> None:
    """Run the whole path on embedded defaults: synthetic data, train, publish, score three samples, report."""
    from allscore.demo import run_demo

    run_demo(workdir, epochs=epochs, fresh=fresh)
