"""`allscore store init`: make sure the model store exists (the compose one-shot that creates the bucket)."""

from __future__ import annotations

from typing import Annotated

import typer

from core.settings import get_settings
from core.storage import LocalStore, S3Store, is_s3

store_app = typer.Typer(help="The object store.", no_args_is_help=True)


@store_app.command("init")
def init_cmd(
    uri: Annotated[str | None, typer.Argument(metavar="URI", help="default ALLSCORE_MODEL_STORE")] = None,
) -> None:
    """Create the bucket (s3://) or folder of the model store unless it exists."""
    target = uri or get_settings().model_store
    created = S3Store().ensure_bucket(target) if is_s3(target) else LocalStore().ensure_folder(target)
    typer.echo(f"{target}: {'created' if created else 'exists'}")
