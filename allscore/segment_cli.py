"""`allscore segment`: find the white cells of microscope fields and write them as C-NMC-style crops.

The crops are 450x450 BMPs at the C-NMC scale (or --crop-um-per-px), named UID_<slide>_<field>_<cell>.bmp with the
slide as the subject: sorted by a person into all/ and hem/ folders, `allscore train` takes them. Whole lymphoid
cells go into OUT, whole `other` cells into OUT/other (train ignores that folder), cells cut by a field's edge are
listed but not cut. With --json, one JSON object per cell on stdout: the contract scripts rely on.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image

from core.console import stderr_console
from core.imaging import DecodeError, decode_field
from core.settings import get_settings
from core.storage import Fetcher, StorageError

err = stderr_console()


def slide_name(text: str) -> str:
    """A subject id for a slide: letters, digits and '-' (what the trainer's crop names allow)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "slide"


def segment_cmd(
    uris: Annotated[list[str], typer.Argument(metavar="FIELD_URI...", help="fields: files, folders, globs, s3://")],
    out: Annotated[Path, typer.Option(help="folder for the crops (created)")],
    um_per_px: Annotated[
        float | None, typer.Option(help="the fields' scale; default: estimated from the red cells (median of 8)")
    ] = None,
    slide: Annotated[
        str | None, typer.Option(help="the slide (subject) the crops are named by; default the folder")
    ] = None,
    crop_um_per_px: Annotated[
        float | None, typer.Option(help="scale of the crops written; default the C-NMC scale (CNMC_UM_PER_PX)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per cell")] = False,
) -> None:
    """Find the white cells of fields and cut each out C-NMC style (450x450 BMP, black outside the cell)."""
    # Imported here: scipy and scikit-image take a while, and every other command starts without them.
    from core.cellkind import LYMPHOID
    from core.cut import cut_cell
    from core.segment import CNMC_UM_PER_PX, segment_field
    from trainer.dataset import write_data_scale
    from worker.client import expand_uris
    from worker.fields import sample_scale

    crop_um_per_px = crop_um_per_px or CNMC_UM_PER_PX
    settings = get_settings()
    fields = expand_uris(uris, settings)
    subject = slide_name(slide or Path(fields[0].rstrip("/")).parent.name)
    fetch = Fetcher(settings)
    source = "given"
    if um_per_px is None:
        with ThreadPoolExecutor(2) as pool:
            um_per_px = sample_scale(fields, fetch, pool, max_pixels=settings.max_image_pixels)
        source = "estimated"
    out.mkdir(parents=True, exist_ok=True)
    (out / "other").mkdir(exist_ok=True)
    failed = written = 0
    for number, uri in enumerate(fields, start=1):
        try:
            rgb = decode_field(fetch(uri), source=uri, max_pixels=settings.max_image_pixels)
        except (StorageError, DecodeError) as exc:
            err.print(f"[red]skipped[/] {uri}: {exc}", highlight=False)
            failed += 1
            continue
        found = segment_field(rgb, um_per_px=um_per_px)
        for cell in found.cells:
            crop: str | None = None
            if not cell.edge:
                name = f"UID_{subject}_{number}_{cell.index + 1}.bmp"
                crop = name if cell.kind == LYMPHOID else f"other/{name}"
                image = cut_cell(rgb, cell, field_um_per_px=found.um_per_px, target_um_per_px=crop_um_per_px)
                Image.fromarray(image).save(out / crop, "BMP")
                written += 1
            if as_json:
                record = {
                    "field": uri,
                    "index": cell.index,
                    "bbox": list(cell.bbox),
                    "centroid": [round(cell.centroid[0], 2), round(cell.centroid[1], 2)],
                    "area_um2": round(cell.area_um2, 2),
                    "kind": cell.kind,
                    "edge": cell.edge,
                    "crop": crop,
                    "um_per_px": round(found.um_per_px, 5),
                    "scale_source": source if um_per_px is not None else found.scale_source,
                }
                sys.stdout.write(json.dumps(record) + "\n")
    write_data_scale(out, crop_um_per_px, f"allscore segment (crops cut at {crop_um_per_px} um/px)")
    err.print(
        f"{written} crops of {len(fields) - failed} fields in {out} (slide {subject}); sort them into "
        f"{out}/all and {out}/hem to train on them" + (f"; {failed} fields could not be read" if failed else "")
    )
    if failed:
        raise typer.Exit(1)
