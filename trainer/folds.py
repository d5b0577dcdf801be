"""K-fold training (`allscore train --folds K`): one model per held-out group of subjects, served as one graph.

Every subject of the data set is held out by exactly one fold model, which is stopped early on that group's loss and
then predicts it: those are the out-of-fold (OOF) predictions, one per cell, none made by a model that trained on
the cell's subject. The decision threshold is chosen on all of them together (every subject, not four validation
subjects), the validation figures (and so the sensitivity and specificity the Rogan-Gladen correction uses) are
computed on them, and each fold's own best threshold is recorded with their spread, which says how much the
threshold would move from one group of subjects to another. A temperature is fitted on the OOF predictions first
(trainer/calibration.py) and served with the version (manifest.temperature), so the threshold and the figures are
on the calibrated p(all) the workers report; the expected calibration error is recorded before and after.

The published model is the fold models' mean probability in one Keras graph (``ensemble``): one forward pass per
batch through K networks, so it costs K times one model (bench/README.md).

Groups: the data set's own folds when K equals their number and each holds both classes (C-NMC's fold_0..2),
otherwise K groups of subjects dealt out by class after a seeded shuffle.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from core.inference import configure_tensorflow, predict_proba
from core.manifest import ModelManifest, ValidationMetrics, new_version
from core.settings import get_settings
from trainer.calibration import apply_temperature, expected_calibration_error, fit_temperature
from trainer.dataset import Dataset, DatasetError, subject_classes
from trainer.discovery import discover
from trainer.export import CHECK_CELLS, evenly_spaced
from trainer.metrics import choose_threshold, summarize
from trainer.report_pictures import training_report
from trainer.train import (
    TrainConfig,
    TrainOutcome,
    _decode_with_progress,
    _progress,
    fit_one,
    kept_epoch,
    provenance,
    seed_everything,
    stain_normalised,
    stain_record,
    training_record,
)


def subject_groups(ds: Dataset, k: int, seed: int = 0) -> tuple[list[list[str]], str]:
    """K groups of subjects, each holding both classes, and how they were made."""
    if k < 2:
        raise DatasetError(f"--folds {k}: K-fold training needs at least 2 folds")
    if any(c.subject is None for c in ds.cells):
        raise DatasetError(f"{ds.root}: some cells have no subject id; K-fold training splits by subject")
    classes = subject_classes(ds.by_subject())
    if ds.folds and len(ds.folds) == k:
        groups = [sorted({c.subject for c in ds.cells if c.fold == f and c.subject}) for f in ds.folds]
        shared = set.intersection(*(set(g) for g in groups)) if groups else set()
        if not shared and all({classes[s] for s in g} == {0, 1} for g in groups):
            return groups, f"the data set's folds {', '.join(ds.folds)}"
    by_class: dict[int, list[str]] = defaultdict(list)
    for subject, label in sorted(classes.items()):
        by_class[label].append(subject)
    if min(len(by_class[0]), len(by_class[1])) < k:
        raise DatasetError(
            f"--folds {k}: each fold needs a subject of each class, and the data set has "
            f"{len(by_class[1])} ALL and {len(by_class[0])} normal subjects; use fewer folds"
        )
    rng = np.random.default_rng(seed)
    groups = [[] for _ in range(k)]
    start = 0
    for label in (1, 0):
        subjects = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        for i, subject in enumerate(subjects):
            groups[(start + i) % k].append(subject)
        start += len(subjects)
    return [sorted(g) for g in groups], f"{k} groups of subjects dealt out by class (seed {seed})"


def ensemble(models: list[Any], name: str = "allscore_ensemble") -> Any:
    """One Keras graph whose output is the mean p(all) of the models (same input)."""
    import keras

    first = models[0]
    inputs = keras.Input(shape=first.inputs[0].shape[1:], dtype=first.inputs[0].dtype, name="image")
    outputs = [m(inputs) for m in models]
    mean = keras.layers.Average(name="p_all", dtype="float32")(outputs)
    return keras.Model(inputs, mean, name=name)


def train_folds(data: Path, config: TrainConfig, k: int, console: Console | None = None) -> TrainOutcome:
    """Train K fold models on every subject of `data` and return their ensemble with out-of-fold figures."""

    console = console or Console(stderr=True)
    started = time.perf_counter()
    settings = get_settings()
    configure_tensorflow(settings.tf_threads)
    seed_everything(config.seed)
    dataset = discover(data)
    groups, how = subject_groups(dataset, k, config.seed)
    console.print(f"data {data}: {len(dataset.cells)} cells from {len(dataset.subjects)} subjects; {k} folds: {how}")

    models: list[Any] = []
    folds: list[dict[str, Any]] = []
    labels_all, p_all, subjects_all = [], [], []
    held_images: list[np.ndarray] = []
    histories: list[dict[str, list[float]]] = []
    target = None
    with _progress(console) as progress:
        for index, held in enumerate(groups):
            fold_started = time.perf_counter()
            held_set = set(held)
            train_ds = dataset.subset(c for c in dataset.cells if c.subject not in held_set)
            val_ds = dataset.subset(c for c in dataset.cells if c.subject in held_set)
            train = _decode_with_progress(progress, train_ds, config.size, f"fold {index + 1}/{k} training cells")
            val = _decode_with_progress(progress, val_ds, config.size, f"fold {index + 1}/{k} held-out cells")
            # One target for every fold (the ensemble serves one): the statistics of all the data set's cells.
            target = stain_normalised(config, target, train, val)
            # Each fold starts from its own seed: the ensemble's members differ by data and by initialisation.
            model, history = fit_one(train, val, config, progress, seed=config.seed + 1000 * index)
            model.name = f"fold_{index + 1}"  # names must be unique inside the ensemble's graph
            p = predict_proba(model, val.images, batch_size=settings.batch_size)
            models.append(model)
            held_images.append(val.images)
            histories.append(history.history)
            labels_all.append(val.labels)
            p_all.append(p)
            subjects_all.extend(val.subjects)
            folds.append(
                {
                    "held_out_subjects": sorted(held),
                    "trained_on_subjects": sorted(train_ds.subjects),
                    "n_train_cells": len(train.labels),
                    "n_held_out_cells": len(val.labels),
                    "epochs_run": len(history.history.get("loss", [])),
                    "best_epoch": kept_epoch(history.history),
                    "seconds": round(time.perf_counter() - fold_started, 1),
                }
            )
            console.print(f"fold {index + 1}/{k}: held out {', '.join(sorted(held))} ({folds[-1]['seconds']:.0f} s)")

    labels = np.concatenate(labels_all)
    raw_oof = np.concatenate(p_all)
    # Calibrated on the out-of-fold predictions, then served so (manifest.temperature): the threshold and every
    # figure below are on the calibrated p(all), as the workers will see it.
    temperature = fit_temperature(raw_oof, labels)
    p_oof = apply_temperature(raw_oof, temperature)
    threshold = choose_threshold(labels, p_oof)
    metrics = summarize(labels, p_oof, threshold, subjects_all)
    for f, fold_labels, fold_p in zip(folds, labels_all, p_all, strict=True):  # each fold's own, same scale
        f["threshold"] = choose_threshold(fold_labels, apply_temperature(fold_p, temperature))
    thresholds = [f["threshold"] for f in folds]
    calibration = {
        "temperature": round(temperature, 4),
        "ece_oof_before": round(expected_calibration_error(raw_oof, labels), 4),
        "ece_oof": round(expected_calibration_error(p_oof, labels), 4),
        "fitted_on": f"{len(labels)} out-of-fold cells of {len(dataset.subjects)} subjects",
    }
    model = ensemble(models)
    pictures = training_report(
        labels=labels,
        p=p_oof,
        threshold=threshold,
        metrics=metrics,
        history=histories[0],
        subjects=subjects_all,
        best_epoch=folds[0]["best_epoch"],
    )
    check_from = np.concatenate(held_images)
    check = evenly_spaced(len(check_from), CHECK_CELLS)
    seconds = time.perf_counter() - started
    manifest = ModelManifest(
        name=config.name,
        version=config.version or new_version(),
        created_at=datetime.now(UTC).isoformat(),
        architecture=f"ensemble of {k} {config.arch}",
        input_size=config.size,
        threshold=threshold,
        temperature=temperature,
        threshold_criterion=(
            f"maximises weighted F1 on the out-of-fold predictions of all {len(dataset.subjects)} subjects "
            f"(each predicted by the fold model that did not train on it)"
        ),
        validation=ValidationMetrics.model_validate(metrics),
        train_subjects=sorted(dataset.subjects),
        val_subjects=sorted(dataset.subjects),
        split=f"by subject, {k}-fold: {how}; validation figures are out of fold",
        n_train_cells=len(labels),
        n_val_cells=len(labels),
        training=training_record(
            config,
            seconds,
            folds=k,
            per_fold=folds,
            fold_thresholds=thresholds,
            fold_threshold_spread=round(max(thresholds) - min(thresholds), 4),
            calibration=calibration,
        ),
        stain_norm=stain_record(target, data),
        **provenance(data, pictures),
    )
    return TrainOutcome(
        model=model,
        manifest=manifest,
        seconds=seconds,
        pictures=pictures,
        check_images=check_from[check],
        checked_on=f"{len(check)} out-of-fold cells of {data}",
    )


__all__ = ["ensemble", "subject_groups", "train_folds"]
