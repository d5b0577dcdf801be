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
from core.errors import AllscoreError
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


def main() -> None:
    """Entry point: run the app; errors a user can meet print one clear line and exit 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        app()
    except AllscoreError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path(".demo"), help="folder for the demo's data, models, database, montages"),
    epochs: int = typer.Option(30, help="maximum training epochs"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the folder first"),
) -> None:
    """Run the whole path on embedded defaults: synthetic data, train, publish, score three samples, report."""
    from allscore.demo import run_demo

    run_demo(workdir, epochs=epochs, fresh=fresh)
