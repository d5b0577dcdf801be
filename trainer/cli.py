"""The trainer's commands: `data synth`, `train`, `evaluate`, `models ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from core.artifact import Registry
from core.console import stderr_console, stdout_console

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="model store root (folder or s3://); default ALLSCORE_MODEL_STORE"),
]

data_app = typer.Typer(help="Data sets: synthetic C-NMC-layout cells.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry: list, show, promote, export.", no_args_is_help=True)
err = stderr_console()
out = stdout_console()


@data_app.command("synth")
def synth_cmd(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="folder to write the data set into")],
    subjects: Annotated[int, typer.Option(help="subjects in all (split over three folds)")] = 12,
    cells: Annotated[int, typer.Option(help="cells per subject")] = 120,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    tint: Annotated[
        float, typer.Option(help="how much each subject's stain differs (0.05; 0.10 is harder), 0-0.3")
    ] = 0.05,
    first_subject: Annotated[
        int, typer.Option(help="number of the first subject (101: other subjects than a set made from 1)")
    ] = 1,
) -> None:
    """Write a SYNTHETIC data set in the C-NMC 2019 layout (fold_k/all, fold_k/hem, 450x450 BMP)."""
    from trainer.synth import synthesize

    summary = synthesize(out_dir, subjects=subjects, cells=cells, seed=seed, tint=tint, first_subject=first_subject)
    err.print(f"wrote {summary}")
    typer.echo(str(out_dir))


@data_app.command("synth-fields")
def synth_fields_cmd(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="folder to write the fields into")],
    fields: Annotated[int, typer.Option(help="fields (1024x768 PNG; one slide, all at one scale)")] = 12,
    cells_per_field: Annotated[int, typer.Option(help="white cells per field")] = 12,
    all_fraction: Annotated[float, typer.Option(help="probability that a white cell is malignant")] = 0.3,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    crops: Annotated[bool, typer.Option(help="also write each white cell's 450x450 crop")] = False,
    um_per_px: Annotated[
        float | None, typer.Option("--um-per-px", help="the slide's scale; default drawn from 0.08-0.16", min=0.01)
    ] = None,
) -> None:
    """Write SYNTHETIC smear fields (fields/*.png) with known white cells (truth.csv) and optional crops."""
    from trainer.synth_fields import synthesize_fields

    scale = (um_per_px, um_per_px) if um_per_px else (0.08, 0.16)
    summary = synthesize_fields(
        out_dir,
        fields=fields,
        cells_per_field=cells_per_field,
        all_fraction=all_fraction,
        seed=seed,
        crops=crops,
        um_per_px=scale,
    )
    err.print(f"wrote {summary.describe()}")
    typer.echo(str(out_dir))


def train_cmd(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="C-NMC layout root (folds found by walking it)")],
    out_store: Annotated[
        str | None, typer.Option("--out", help="store to publish to; default ALLSCORE_MODEL_STORE")
    ] = None,
    name: Annotated[str, typer.Option(help="model name")] = "allscore",
    arch: Annotated[str, typer.Option(help="seed | carpenter | tiny")] = "seed",
    image_size: Annotated[int | None, typer.Option(help="input size; default per architecture")] = None,
    epochs: Annotated[int, typer.Option(help="maximum epochs (early stopping on val loss)")] = 30,
    batch_size: Annotated[int, typer.Option(help="training batch size")] = 32,
    val_fold: Annotated[str | None, typer.Option(help="fold to hold out, e.g. 2")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="fraction of SUBJECTS to hold out")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    patience: Annotated[int, typer.Option(help="early-stopping patience in epochs")] = 6,
    version: Annotated[str | None, typer.Option(help="version; default a UTC timestamp")] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="turn off flips/rotations")] = False,
    folds: Annotated[
        int,
        typer.Option(
            help="K > 1: one model per held-out group of subjects, published as their mean; threshold and "
            "validation figures out of fold (1: one model, one validation fold)"
        ),
    ] = 1,
    stain_norm: Annotated[
        str,
        typer.Option(
            help="'sample': normalise each subject's cells onto the training set's colour statistics (Reinhard), "
            "and serve each sample so; 'none' (default): as read"
        ),
    ] = "none",
) -> None:
    """Train a CNN on held-out-subject validation and publish it; the last stdout line is `name:version`."""
    from trainer.train import TrainConfig, publish, train_model

    if val_fold is not None and val_fraction is not None:
        raise typer.BadParameter("give --val-fold or --val-fraction, not both")
    if folds < 1:
        raise typer.BadParameter(f"--folds {folds}: give 1 (one model) or K >= 2 folds")
    if folds > 1 and (val_fold is not None or val_fraction is not None):
        raise typer.BadParameter("--folds K holds out every subject once: leave out --val-fold and --val-fraction")
    if stain_norm not in ("none", "sample"):
        raise typer.BadParameter(f"--stain-norm {stain_norm!r}: choose 'none' or 'sample'")
    config = TrainConfig(
        name=name,
        arch=arch,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        val_fold=val_fold,
        val_fraction=val_fraction,
        seed=seed,
        patience=patience,
        version=version,
        augment=not no_augment,
        stain_norm=stain_norm,
    )
    if folds > 1:
        from trainer.folds import train_folds

        outcome = train_folds(data, config, folds, err)
    else:
        outcome = train_model(data, config, err)
    manifest = publish(outcome, out_store)
    v = manifest.validation
    err.print(
        f"validation ({manifest.split}; {v.n_cells} cells, {v.n_subjects} subjects): "
        f"weighted F1 {v.weighted_f1:.4f}  AUC {_fmt(v.auc)}  sensitivity {_fmt(v.sensitivity)}  "
        f"specificity {_fmt(v.specificity)}  threshold {manifest.threshold:.3f}  "
        f"({outcome.seconds / 60:.1f} min)"
    )
    typer.echo(manifest.ref)


def evaluate_cmd(
    ref: Annotated[str, typer.Argument(metavar="REF", help="name:version, name@alias or a URI")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="labelled data (C-NMC layout or prelim CSV)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    store: StoreOpt = None,
) -> None:
    """Weighted F1, AUC, sensitivity, specificity (positive class `all`) of a model on a data set."""
    from trainer.evaluate import evaluate

    result = evaluate(ref, data, store=store)
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"{result['model']} on {data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "weighted_f1",
        "auc",
        "sensitivity",
        "specificity",
        "accuracy",
        "threshold",
        "mean_subject_accuracy",
        "n_cells",
        "n_subjects",
        "n_failed",
    ):
        table.add_row(key, _fmt(result[key]))
    out.print(table)


@models_app.command("list")
def models_list(store: StoreOpt = None) -> None:
    """Every published version, with aliases and validation figures."""
    registry = Registry(store)
    table = Table(title=f"models in {registry.root}")
    for col in ("reference", "aliases", "arch", "size", "weighted F1", "AUC", "created"):
        table.add_column(col)
    aliases: dict[str, dict[str, str]] = {}
    for m in registry.list():
        by_version = aliases.setdefault(m.name, {})
        if not by_version:
            for alias, version in registry.aliases(m.name).items():
                by_version[version] = (by_version.get(version, "") + f" {alias}").strip()
        table.add_row(
            m.ref,
            by_version.get(m.version, ""),
            m.architecture,
            str(m.input_size),
            _fmt(m.validation.weighted_f1),
            _fmt(m.validation.auc),
            m.created_at[:19],
        )
    out.print(table)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(metavar="REF")], store: StoreOpt = None) -> None:
    """Print a version's manifest as JSON."""
    typer.echo(Registry(store).resolve(ref).model_dump_json(indent=2))


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(metavar="REF")],
    alias: Annotated[str, typer.Argument(metavar="ALIAS", help="e.g. production")],
    store: StoreOpt = None,
) -> None:
    """Point name@ALIAS at the version REF resolves to."""
    manifest = Registry(store).promote(ref, alias)
    typer.echo(f"{manifest.name}@{alias} -> {manifest.ref}")


@models_app.command("export")
def models_export(
    ref: Annotated[str, typer.Argument(metavar="REF", help="name:version, name@alias or a URI")],
    data: Annotated[
        Path | None,
        typer.Option(help="data set holding the version's validation subjects; default the one it was trained on"),
    ] = None,
    store: StoreOpt = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="also quantize to int8 (model-int8.onnx): calibrated on half the validation subjects, published "
            "only if weighted F1 on the other half moves by at most 0.01",
        ),
    ] = False,
) -> None:
    """Add the ONNX export (model.onnx) to a version published without one, for ALLSCORE_RUNTIME=onnxruntime
    workers. Its outputs are checked against model.keras on the version's validation cells (synthetic cells when
    that data set is not here) before it is published beside the version. Needs TensorFlow and allscore[onnx]."""
    from trainer.export import export_int8_published, export_published

    manifest = export_published(ref, store=store, data=data)
    record = manifest.exports["onnx"]
    err.print(
        f"{manifest.ref}: {record.file} ({record.converter}, opset {record.opset}), max |p difference| "
        f"{record.max_abs_diff:.2g} <= {record.tolerance} on {record.checked_on}"
    )
    if int8:
        manifest = export_int8_published(manifest.ref if "://" not in ref else ref, store=store, data=data)
        q = manifest.exports["onnx-int8"]
        err.print(
            f"{manifest.ref}: {q.file}, weighted F1 {q.wf1_float32} -> {q.wf1_int8} ({q.wf1_delta:+}, gate "
            f"{q.wf1_gate}) on {q.checked_on}; calibrated on {q.calibrated_on}"
        )
    typer.echo(manifest.ref)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
