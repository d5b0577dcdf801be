"""Model quality from run to run and from subject to subject (issue 14's protocol), on SYNTHETIC data.

For one subject tint: a training set made by `allscore data synth` (12 subjects, 120 cells each, its defaults) and
a held-out set of 6 other subjects (numbers from 101, 400 cells each: no subject in common). For each seed: train
with the defaults (plus --folds K), publish to a local store, evaluate on the held-out subjects (weighted F1, AUC,
sensitivity, specificity at the version's threshold), and score mixed samples of 500 held-out cells at true ALL
fractions 0.05, 0.20 and 0.50 (five draws each, without replacement): the raw fraction of cells called ALL and the
Rogan-Gladen fraction corrected with the version's (out-of-fold) sensitivity and specificity. Writes
bench/results/quality_<tint>.json and prints a table; bench/README.md keeps the figures.

    python -m bench.quality --tint 0.05 --seeds 0 1 2 --folds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).with_name("results")
FRACTIONS = (0.05, 0.20, 0.50)
SAMPLE_CELLS = 500
DRAWS = 5


def make_sets(work: Path, tint: float) -> tuple[Path, Path]:
    """The training set (the generator's defaults) and the held-out subjects (from 101), at one tint."""
    from trainer.synth import synthesize

    train, held = work / "train", work / "held"
    if not train.exists():
        synthesize(train, seed=0, tint=tint)
    if not held.exists():
        synthesize(held, subjects=6, cells=400, seed=0, tint=tint, first_subject=101)
    return train, held


def mixed_samples(
    labels: np.ndarray, calls: Callable[[np.ndarray], np.ndarray], sens: float, spec: float, seed: int
) -> dict[str, Any]:
    """The fraction called ALL and its Rogan-Gladen correction on mixed samples drawn from the held-out cells;
    `calls(rows)` scores one sample (the rows of its cells) and returns each cell's call."""
    from core.stats import rogan_gladen

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    out: dict[str, Any] = {}
    for truth in FRACTIONS:
        n_pos = round(truth * SAMPLE_CELLS)
        raw, corrected = [], []
        for _ in range(DRAWS):
            cells = np.r_[rng.choice(pos, n_pos, replace=False), rng.choice(neg, SAMPLE_CELLS - n_pos, replace=False)]
            fraction = float(calls(cells).mean())
            raw.append(fraction)
            corrected.append(rogan_gladen(fraction, sens, spec))
        errors = [abs(c - truth) for c in corrected if c is not None]
        out[f"{truth:.2f}"] = {
            "raw": [round(r, 4) for r in raw],
            "corrected": [None if c is None else round(c, 4) for c in corrected],
            "max_abs_error_corrected": round(max(errors), 4) if errors else None,
        }
    return out


def held_out_in_slides(
    labels: np.ndarray, scores: Callable[[np.ndarray], np.ndarray], threshold: float, seed: int, cells: int = 300
) -> dict[str, Any]:
    """Weighted F1, sensitivity and specificity with every held-out cell scored inside a mixed slide: the cells
    dealt at random into samples of `cells` (both classes in each, as in a patient's slide), each sample scored
    on its own (`scores(rows)` -> p(all)). With per-sample normalisation this is the figure a lab sees; scored
    subject by subject, a single-class subject lets normalisation take part of the class out with the stain."""
    from trainer.metrics import summarize

    rows = np.random.default_rng(seed + 1000).permutation(len(labels))
    p = np.empty(len(labels))
    for start in range(0, len(rows), cells):
        chunk = rows[start : start + cells]
        p[chunk] = scores(chunk)
    m = summarize(labels, p, threshold, [None] * len(labels))
    return {k: m[k] for k in ("weighted_f1", "auc", "sensitivity", "specificity", "n_cells")} | {"slide_cells": cells}


SLIDE_CELLS = 300
SLIDE_DRAWS = 3


def stained_slides(work: Path, tint: float, size: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Mixed slides as a lab has them: each one new patient's slide, ONE stain (a fresh tint of the same strength),
    both classes on it: SLIDE_DRAWS slides of SLIDE_CELLS cells at each true ALL fraction, rendered at 450x450 and
    taken to the model's size as a crop file would be. Cached per tint and size. (truth, images, labels) each."""
    from core.imaging import model_input
    from trainer.synth import render_cell, subject_tint

    cache = work / f"slides_{size}.npz"
    if cache.exists():
        data = np.load(cache)
        return [(float(t), data[f"x{i}"], data[f"y{i}"]) for i, t in enumerate(data["truths"])]
    slides: list[tuple[float, np.ndarray, np.ndarray]] = []
    arrays: dict[str, Any] = {}
    for f, truth in enumerate(FRACTIONS):
        for d in range(SLIDE_DRAWS):
            rng = np.random.default_rng([9001, f, d])  # none of the training or held-out subjects' streams
            stain = subject_tint(rng, tint)
            labels = rng.permutation(np.arange(SLIDE_CELLS) < round(truth * SLIDE_CELLS)).astype(np.int64)
            images = np.stack([model_input(render_cell(rng, bool(y), stain, 450), size) for y in labels])
            arrays[f"x{len(slides)}"], arrays[f"y{len(slides)}"] = images, labels
            slides.append((truth, images, labels))
    arrays["truths"] = np.array([t for t, _, _ in slides])
    np.savez(cache, **arrays)
    return slides


def score_field_slide(
    slide: tuple[np.ndarray, np.ndarray], score: Callable[[np.ndarray], np.ndarray], manifest: Any
) -> dict[str, Any]:
    """The field slide's crops scored as one sample: the fraction called ALL (raw and corrected) against the truth."""
    from core.stats import rogan_gladen

    images, labels = slide
    calls = score(images) >= manifest.threshold
    raw = float(calls.mean())
    corrected = rogan_gladen(raw, manifest.validation.sensitivity or 0.0, manifest.validation.specificity or 0.0)
    return {
        "truth": round(float(labels.mean()), 4),
        "raw": round(raw, 4),
        "corrected": None if corrected is None else round(corrected, 4),
        "sensitivity": round(float(calls[labels == 1].mean()), 4),
        "specificity": round(float(1 - calls[labels == 0].mean()), 4),
        "n_cells": len(labels),
    }


def score_stained_slides(
    slides: list[tuple[float, np.ndarray, np.ndarray]],
    score: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    sens: float,
    spec: float,
) -> dict[str, Any]:
    """Each slide scored on its own: its fraction called ALL, Rogan-Gladen corrected, against the truth; and weighted
    F1, sensitivity and specificity over every slide's cells."""
    from core.stats import rogan_gladen
    from trainer.metrics import summarize

    out: dict[str, Any] = {}
    labels, p_all = [], []
    for truth, images, y in slides:
        p = score(images)
        labels.append(y)
        p_all.append(p)
        raw = float(np.mean(p >= threshold))
        corrected = rogan_gladen(raw, sens, spec)
        entry = out.setdefault(f"{truth:.2f}", {"raw": [], "corrected": [], "max_abs_error_corrected": 0.0})
        entry["raw"].append(round(raw, 4))
        entry["corrected"].append(None if corrected is None else round(corrected, 4))
        if corrected is not None:
            entry["max_abs_error_corrected"] = round(max(entry["max_abs_error_corrected"], abs(corrected - truth)), 4)
    y, p = np.concatenate(labels), np.concatenate(p_all)
    m = summarize(y, p, threshold, [None] * len(y))
    out.update({k: m[k] for k in ("weighted_f1", "auc", "sensitivity", "specificity", "n_cells")})
    out["slides"] = f"{SLIDE_DRAWS} slides of {SLIDE_CELLS} cells at each fraction, each with its own stain"
    return out


def field_slide(work: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The C-NMC-style crops of the whole white cells of a synthetic field slide (`allscore data synth-fields`: 25
    fields of 12 white cells, seed 23, the fields bench's slide; cut by the generator itself, so detection plays no
    part), at the model's size, and their labels. These cells are drawn by the field generator, in a smear."""
    import csv

    from core.imaging import load_image
    from trainer.synth_fields import synthesize_fields

    out = work / "field-slide"
    if not (out / "truth.csv").exists():
        synthesize_fields(out, fields=25, cells_per_field=12, seed=23, crops=True)
    with (out / "truth.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["edge"] == "0" and r["crop"]]
    images = np.stack([load_image(out / r["crop"], size) for r in rows])
    return images, np.array([r["label"] == "all" for r in rows], dtype=np.int64)


def run_seed(
    train: Path,
    held: Path,
    store: Path,
    *,
    seed: int,
    folds: int,
    epochs: int,
    stain_norm: str = "none",
    tint: float = 0.05,
) -> dict[str, Any]:
    """Train one version with the defaults at this seed, evaluate it on the held-out subjects, score mixtures.

    With --stain-norm sample, a held-out subject is normalised with its own statistics (a slide is one subject),
    and each mixed sample with its own: the figures that say whether normalisation holds on mixed slides."""
    from rich.console import Console

    from trainer.folds import train_folds
    from trainer.train import TrainConfig, publish, train_model

    tag = "" if stain_norm == "none" else f"-{stain_norm}"
    config = TrainConfig(
        name="quality", seed=seed, epochs=epochs, version=f"s{seed}-k{folds}{tag}", stain_norm=stain_norm
    )
    console = Console(stderr=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = train_folds(train, config, folds, console) if folds > 1 else train_model(train, config, console)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    manifest = publish(outcome, str(store))
    return {
        "seed": seed,
        "ref": manifest.ref,
        "train_minutes": round(seconds / 60, 2),
        # CPU time of this process (every thread): on a shared machine, minutes / cores is the quiet wall time.
        "train_cpu_minutes": round(cpu_seconds / 60, 2),
        "fold_minutes": [round(f["seconds"] / 60, 2) for f in manifest.training.get("per_fold", [])],
        **evaluate_version(store, manifest.ref, held, seed, tint),
    }


def evaluate_version(store: Path, ref: str, held: Path, seed: int, tint: float) -> dict[str, Any]:
    """A published version on the held-out subjects: per subject, in mixed slides, mixed-sample fractions, TTA."""
    from core.artifact import load_model
    from core.calibration import apply_temperature
    from core.inference import ServingModel, predict_proba
    from core.stainnorm import fit as fit_stain
    from core.stainnorm import normalise
    from core.tta import averaged
    from trainer.discovery import discover
    from trainer.export import as_served
    from trainer.loading import decode_cells
    from trainer.metrics import summarize
    from worker.engine import stain_target

    loaded = load_model(ref, store=str(store))
    manifest = loaded.manifest
    cells = [c for c in discover(held).cells if c.label is not None]
    arrays = decode_cells(cells, manifest.input_size)
    raw_images = arrays.images
    stain = stain_target(manifest)
    arrays.images = as_served(manifest, arrays.images, arrays.subjects)  # each held-out subject as one slide
    served = ServingModel(loaded.model)
    scored = time.perf_counter()
    p = apply_temperature(predict_proba(served, arrays.images), manifest.temperature)
    plain_s = time.perf_counter() - scored
    metrics = summarize(arrays.labels, p, manifest.threshold, arrays.subjects)
    # Test-time augmentation: the mean over the 8 flips and rotations, at the same threshold and temperature.
    scored = time.perf_counter()
    p8 = apply_temperature(averaged(lambda x: predict_proba(served, x), arrays.images, 8), manifest.temperature)
    tta_s = time.perf_counter() - scored
    tta = summarize(arrays.labels, p8, manifest.threshold, arrays.subjects)
    sens, spec = manifest.validation.sensitivity, manifest.validation.specificity

    def slide_scores(images: np.ndarray) -> np.ndarray:
        # One sample scored as a worker scores it (normalised with its own statistics when the version says so).
        x = images if stain is None else normalise(images, fit_stain(images), stain)
        return apply_temperature(predict_proba(served, x), manifest.temperature)

    def sample_scores(rows: np.ndarray) -> np.ndarray:
        return p[rows] if stain is None else slide_scores(raw_images[rows])

    def sample_calls(rows: np.ndarray) -> np.ndarray:
        return (sample_scores(rows) >= manifest.threshold).astype(int)

    return {
        "threshold": round(manifest.threshold, 4),
        "fold_thresholds": manifest.training.get("fold_thresholds"),
        "calibration": manifest.training.get("calibration"),
        "validation_oof": {
            k: getattr(manifest.validation, k) for k in ("weighted_f1", "auc", "sensitivity", "specificity")
        },
        "held_out": {
            k: metrics[k] for k in ("weighted_f1", "auc", "sensitivity", "specificity", "n_cells", "n_subjects")
        },
        "stain_norm": manifest.training.get("stain_norm", "none"),
        "mixed_samples": mixed_samples(arrays.labels, sample_calls, sens or 0.0, spec or 0.0, seed),
        "held_out_in_slides": held_out_in_slides(arrays.labels, sample_scores, manifest.threshold, seed),
        "field_slide": score_field_slide(field_slide(held.parent, manifest.input_size), slide_scores, manifest),
        "stained_slides": score_stained_slides(
            stained_slides(held.parent, tint, manifest.input_size),
            slide_scores,
            manifest.threshold,
            sens or 0.0,
            spec or 0.0,
        ),
        "tta8_held_out": {k: tta[k] for k in ("weighted_f1", "auc", "sensitivity", "specificity")},
        "tta8_cost": round(tta_s / plain_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tint", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--stain-norm", choices=("none", "sample"), default="none")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="evaluate the versions of an earlier run again (its --work, tint, folds, stain-norm) and update its JSON",
    )
    parser.add_argument("--work", type=Path, help="keep the data sets here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="allscore-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held = make_sets(work / f"tint{args.tint:g}", args.tint)
    runs: list[dict[str, Any]] = []
    if args.rescore:
        out = write_summary(
            rescore(work, args.tint, args.folds, args.stain_norm, held), args.tint, args.folds, args.stain_norm
        )
        print(f"written to {out}")
        return
    for seed in args.seeds:
        store = work / f"tint{args.tint:g}" / "store"  # one per tint: the versions are named by seed and folds
        runs.append(
            run_seed(
                train,
                held,
                store,
                seed=seed,
                folds=args.folds,
                epochs=args.epochs,
                stain_norm=args.stain_norm,
                tint=args.tint,
            )
        )
        # After every seed: a long run cut short keeps its seeds.
        out = write_summary(runs, args.tint, args.folds, args.stain_norm)
    for r in runs:
        h = r["held_out"]
        print(
            f"seed {r['seed']}: held-out weighted F1 {h['weighted_f1']:.4f} AUC {h['auc']:.4f} "
            f"sens {h['sensitivity']:.3f} spec {h['specificity']:.3f}; threshold {r['threshold']:.3f}; "
            f"{r['train_minutes']:.1f} min"
        )
    summary = json.loads(out.read_text())
    print(
        f"spread {summary['held_out_weighted_f1_spread']}, mixed samples max |corrected - truth| "
        f"{summary['mixed_max_abs_error_corrected']}; written to {out}"
    )


def rescore(work: Path, tint: float, folds: int, stain_norm: str, held: Path) -> list[dict[str, Any]]:
    """The runs of an earlier results file, each version evaluated again (training figures kept)."""
    earlier = json.loads(results_path(tint, folds, stain_norm).read_text())["runs"]
    store = work / f"tint{tint:g}" / "store"
    return [{**run, **evaluate_version(store, run["ref"], held, run["seed"], tint)} for run in earlier]


def results_path(tint: float, folds: int, stain_norm: str) -> Path:
    return RESULTS / f"quality_tint{tint:g}_k{folds}{'' if stain_norm == 'none' else '_' + stain_norm}.json"


def write_summary(runs: list[dict[str, Any]], tint: float, folds: int, stain_norm: str = "none") -> Path:
    """bench/results/quality_tint<T>_k<K>.json from the runs so far."""
    from bench.common import machine

    f1 = [r["held_out"]["weighted_f1"] for r in runs]
    errors = [r["mixed_samples"][f"{t:.2f}"]["max_abs_error_corrected"] for r in runs for t in FRACTIONS]
    result = {
        "machine": machine(),
        "data": f"allscore data synth (12 subjects, 120 cells, seed 0, tint {tint}); held out: 6 other "
        "subjects (101-103, H101-H103), 400 cells each",
        "folds": folds,
        "stain_norm": stain_norm,
        "runs": runs,
        "held_out_weighted_f1": f1,
        "held_out_weighted_f1_min": min(f1),
        "held_out_weighted_f1_spread": round(max(f1) - min(f1), 4),
        "held_out_weighted_f1_median": statistics.median(f1),
        "mixed_max_abs_error_corrected": max((e for e in errors if e is not None), default=None),
        # Each held-out cell scored inside a mixed slide of 300 (the figure a lab sees with per-sample normalisation).
        "in_slides_weighted_f1": [r.get("held_out_in_slides", {}).get("weighted_f1") for r in runs],
        "field_slide_raw_fraction": [r.get("field_slide", {}).get("raw") for r in runs],
        # Mixed slides with one stain each (a patient's slide): the realistic test of per-sample normalisation.
        "stained_slides_weighted_f1": [r.get("stained_slides", {}).get("weighted_f1") for r in runs],
        "stained_slides_max_abs_error_corrected": max(
            (
                r["stained_slides"][f"{t:.2f}"]["max_abs_error_corrected"]
                for r in runs
                if "stained_slides" in r
                for t in FRACTIONS
            ),
            default=None,
        ),
        "train_minutes": [r["train_minutes"] for r in runs],
    }
    RESULTS.mkdir(exist_ok=True)
    out = results_path(tint, folds, stain_norm)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
