"""Training: split by subject, decode, fit with augmentation and class weights, pick a threshold, publish."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.artifact import Registry
from core.inference import configure_tensorflow, predict_proba
from core.manifest import ModelManifest, StainNormRecord, ValidationMetrics, new_version, sha256_file
from core.settings import Settings, get_settings
from core.stainnorm import StainStats, normalise_groups
from core.stainnorm import fit as fit_stain
from trainer.arch import DEFAULT_SIZES, build_model, check_architecture
from trainer.dataset import Dataset, data_scale, split_by_subject
from trainer.discovery import discover
from trainer.export import CHECK_CELLS, converter_available, evenly_spaced, make_onnx_export, synthetic_check_cells
from trainer.loading import CellArrays, decode_cells
from trainer.metrics import choose_threshold, summarize
from trainer.report_pictures import training_report

log = logging.getLogger(__name__)

# Augmentation strengths: per-channel gain and overall brightness, as fractions.
COLOR_JITTER = 0.12
BRIGHTNESS_JITTER = 0.15


@dataclass
class TrainConfig:
    """Everything that decides a training run; recorded in the manifest."""

    name: str = "allscore"
    arch: str = "seed"
    image_size: int | None = None
    epochs: int = 30
    batch_size: int = 32
    val_fold: str | None = None
    val_fraction: float | None = None
    seed: int = 0
    patience: int = 6
    learning_rate: float = 1e-3
    augment: bool = True
    # Per-sample stain normalisation (core/stainnorm.py): "none", or "sample" (each subject's cells normalised onto
    # the training set's statistics with the subject's own; the worker does the same per sample). "sample" won on
    # crops of other stains but over-called ALL on the cells cut from field slides, so it is an option, not the
    # default (README, "Stain normalisation, per sample").
    stain_norm: str = "none"
    version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The model's input size."""
        return self.image_size or DEFAULT_SIZES.get(self.arch, 64)


@dataclass
class TrainOutcome:
    """A trained model and the manifest it will be published with."""

    model: Any
    manifest: ModelManifest
    seconds: float
    # The training report (trainer/report_pictures.py): file name -> PNG, listed in manifest.report_pictures.
    pictures: dict[str, bytes] = field(default_factory=dict)
    # The validation cells (a deterministic sample) the serving export is checked on before publishing.
    check_images: np.ndarray | None = None
    checked_on: str = ""


def _class_weights(labels: np.ndarray) -> dict[int, float]:
    # Balanced weights: each class contributes equally to the loss whatever its share of cells.
    n = len(labels)
    return {c: float(n / (2 * max(1, int(np.sum(labels == c))))) for c in (0, 1)}


def _augmented(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, augment: bool) -> Any:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y.astype("float32")))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if augment:
        # Cells have no orientation: flips and 90-degree rotations are label-preserving.
        def aug(img: Any, label: Any) -> Any:
            img = tf.image.random_flip_left_right(img, seed=seed)
            img = tf.image.random_flip_up_down(img, seed=seed + 1)
            k = tf.random.uniform([], 0, 4, dtype=tf.int32, seed=seed + 2)
            img = tf.image.rot90(img, k)
            # Stain varies between subjects and labs: jitter brightness and colour so the model
            # learns shape and chromatin, not one subject's tint. The black background stays black.
            x = tf.cast(img, tf.float32)
            mask = tf.cast(tf.reduce_max(x, axis=-1, keepdims=True) > 8.0, tf.float32)
            gain = tf.random.uniform([1, 1, 3], 1.0 - COLOR_JITTER, 1.0 + COLOR_JITTER, seed=seed + 3)
            scale = tf.random.uniform([], 1.0 - BRIGHTNESS_JITTER, 1.0 + BRIGHTNESS_JITTER, seed=seed + 4)
            x = x * (1.0 - mask) + tf.clip_by_value(x * gain * scale, 0.0, 255.0) * mask
            return tf.cast(x, tf.uint8), label

        ds = ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _progress_callback(progress: Progress, epochs: int) -> Any:
    import keras

    class RichEpochs(keras.callbacks.Callback):
        """One progress line, updated per epoch with the losses and validation AUC."""

        def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
            self.task = progress.add_task("training", total=epochs, info="")

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            info = "  ".join(f"{k}={logs[k]:.4f}" for k in ("loss", "val_loss", "val_auc") if k in logs)
            progress.update(self.task, advance=1, info=info)

    return RichEpochs()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


def stain_normalised(
    config: TrainConfig, target: StainStats | None, *arrays: CellArrays, all_images: np.ndarray | None = None
) -> StainStats | None:
    """With --stain-norm sample: each subject's cells in `arrays` normalised in place onto `target` (when None,
    fitted on `all_images`, else on every image of `arrays`). Returns the target (None without normalisation)."""
    if config.stain_norm == "none":
        return None
    if target is None:
        target = fit_stain(all_images if all_images is not None else np.concatenate([a.images for a in arrays]))
    for a in arrays:
        a.images = normalise_groups(a.images, a.subjects, target)
    return target


def stain_record(target: StainStats | None, data: Path) -> StainNormRecord | None:
    if target is None:
        return None
    return StainNormRecord.from_target(
        target, f"target: the cell pixels of {target.n_cells} cells of {data}; each subject fitted on its own cells"
    )


def _decode_with_progress(progress: Progress, ds: Dataset, size: int, label: str) -> CellArrays:
    task = progress.add_task(f"decoding {label}", total=len(ds.cells), info="")
    arrays = decode_cells(ds.cells, size, on_progress=lambda n: progress.update(task, completed=n))
    return arrays


def fit_one(
    train: CellArrays, val: CellArrays, config: TrainConfig, progress: Progress, seed: int | None = None
) -> Any:
    """One model fitted on `train`, stopped early on `val`'s AUC (the weights of its best epoch restored); returns
    (model, keras History)."""
    import keras
    import tensorflow as tf

    seed = config.seed if seed is None else seed
    model = build_model(config.arch, config.size, seed=seed)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    # The epoch kept is the one that ranks the validation cells best (the threshold is chosen on them afterwards,
    # the temperature fitted). Not the lowest validation loss: a model whose batch-norm statistics have not settled
    # gives near-constant p(all), a lower loss than a well-ranking but over-confident one (README, "Training").
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
    )
    # Smaller steps once validation loss stops improving: batch-norm noise otherwise keeps it bouncing.
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=0.3, patience=max(1, config.patience // 3), min_lr=1e-5
    )
    history = model.fit(
        _augmented(train.images, train.labels, config.batch_size, seed, config.augment),
        validation_data=tf.data.Dataset.from_tensor_slices((val.images, val.labels.astype("float32"))).batch(
            config.batch_size
        ),
        epochs=config.epochs,
        class_weight=_class_weights(train.labels),
        callbacks=[stop, plateau, _progress_callback(progress, config.epochs)],
        verbose=0,
        shuffle=False,  # the tf.data pipeline shuffles
    )
    return model, history


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and TensorFlow's generators seeded, and TensorFlow's ops made deterministic: two trainings
    with one seed on one machine give bit-identical weights, at no measurable cost (README, "Training"). Across CPUs
    (AVX2, AVX-512, AMX) oneDNN's kernels differ and so do the last bits."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def kept_epoch(history: dict[str, list[float]]) -> int:
    """The epoch (from 1) whose weights fit_one restored: the first with the highest validation AUC."""
    return int(np.argmax(history["val_auc"])) + 1


def train_model(data: Path, config: TrainConfig, console: Console | None = None) -> TrainOutcome:
    """Train on a C-NMC-layout data set, validating on held-out subjects; nothing is published here."""

    check_architecture(config.arch)  # before minutes of decoding, not after
    console = console or Console(stderr=True)
    started = time.perf_counter()
    settings = get_settings()
    configure_tensorflow(settings.tf_threads)
    seed_everything(config.seed)

    dataset = discover(data)
    train_ds, val_ds = split_by_subject(
        dataset, val_fold=config.val_fold, val_fraction=config.val_fraction, seed=config.seed
    )
    console.print(
        f"data {data}: {len(train_ds.cells)} training cells from {len(train_ds.subjects)} subjects, "
        f"{len(val_ds.cells)} validation cells from {len(val_ds.subjects)} held-out subjects"
    )
    with _progress(console) as progress:
        train = _decode_with_progress(progress, train_ds, config.size, "training cells")
        val = _decode_with_progress(progress, val_ds, config.size, "validation cells")
        # The target is the training cells' statistics; validation subjects are normalised onto it like samples.
        target = stain_normalised(config, None, train, val, all_images=train.images)

        model, history = fit_one(train, val, config, progress)

    p_val = predict_proba(model, val.images, batch_size=settings.batch_size)
    threshold = choose_threshold(val.labels, p_val)
    metrics = summarize(val.labels, p_val, threshold, val.subjects)
    best_epoch = kept_epoch(history.history)
    pictures = training_report(
        labels=val.labels,
        p=p_val,
        threshold=threshold,
        metrics=metrics,
        history=history.history,
        subjects=val.subjects,
        best_epoch=best_epoch,
    )
    seconds = time.perf_counter() - started
    manifest = ModelManifest(
        name=config.name,
        version=config.version or new_version(),
        created_at=datetime.now(UTC).isoformat(),
        architecture=config.arch,
        input_size=config.size,
        threshold=threshold,
        validation=ValidationMetrics.model_validate(metrics),
        train_subjects=sorted(train_ds.subjects),
        val_subjects=sorted(val_ds.subjects),
        split=_describe_split(config, val_ds),
        n_train_cells=len(train.labels),
        n_val_cells=len(val.labels),
        training=training_record(
            config,
            seconds,
            epochs_run=len(history.history.get("loss", [])),
            best_epoch=best_epoch,
            class_weights=_class_weights(train.labels),
        ),
        stain_norm=stain_record(target, data),
        **provenance(data, pictures),
    )
    check = evenly_spaced(len(val.images), CHECK_CELLS)
    return TrainOutcome(
        model=model,
        manifest=manifest,
        seconds=seconds,
        pictures=pictures,
        check_images=val.images[check],
        checked_on=f"{len(check)} validation cells of {data}",
    )


def training_record(config: TrainConfig, seconds: float, **specific: Any) -> dict[str, Any]:
    """The manifest's `training`: the configuration, what this run adds (`specific`), its time, extras."""
    return {
        **{k: v for k, v in asdict(config).items() if k not in ("extra", "version")},
        "image_size": config.size,
        **specific,
        "seconds": round(seconds, 1),
        "precision": "float32",  # training always runs in float32; serving may use bfloat16
        "deterministic_ops": True,  # seed_everything: bit-identical reruns on one machine
        **config.extra,
    }


def provenance(data: Path, pictures: dict[str, bytes]) -> dict[str, Any]:
    """The manifest fields that say where a version came from: libraries, data, its scale, the report's pictures
    (sha256 is filled in at publish)."""
    import keras
    import tensorflow as tf

    scale, scale_source = data_scale(Path(data))
    return {
        "sha256": "",
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "data": str(data),
        "um_per_px": scale,
        "um_per_px_source": scale_source,
        "report_pictures": list(pictures),
    }


def _describe_split(config: TrainConfig, val_ds: Dataset) -> str:
    if config.val_fold is not None:
        return f"by subject: validation = fold {config.val_fold}"
    if config.val_fraction is not None:
        return f"by subject: validation = {config.val_fraction:.0%} of subjects (seed {config.seed})"
    folds = sorted({c.fold for c in val_ds.cells if c.fold is not None})
    if folds:
        return f"by subject: validation = fold {', '.join(folds)} (default: last fold)"
    return "by subject: validation = 20% of subjects (default)"


def publish(
    outcome: TrainOutcome, store: str | None = None, settings: Settings | None = None, *, export: bool = True
) -> ModelManifest:
    """Save the model to model.keras, record its sha256 and publish the version, with its ONNX export (checked
    against model.keras on the validation cells; trainer/export.py) and the training report's pictures beside
    it, to the store. Without the converter installed (allscore[onnx]) the version is published without the
    export, with a warning: `allscore models export REF` adds it later."""
    with tempfile.TemporaryDirectory(prefix="allscore-") as tmp:
        path = Path(tmp) / "model.keras"
        outcome.model.save(path)
        pictures = []
        for name, png in outcome.pictures.items():
            pictures.append(Path(tmp) / name)
            pictures[-1].write_bytes(png)
        manifest = outcome.manifest.model_copy(update={"sha256": sha256_file(path)})
        exports: dict[str, Path] = {}
        if export and not converter_available():
            log.warning(
                "tf2onnx/onnxruntime not installed: %s is published without model.onnx; "
                "install allscore[onnx] and run `allscore models export %s`",
                manifest.ref,
                manifest.ref,
            )
        elif export:
            # The export is made from model.keras as saved, so it is what a worker would load.
            from core.artifact import load_keras

            if outcome.check_images is not None and len(outcome.check_images):
                images, checked_on = outcome.check_images, outcome.checked_on
            else:
                images = synthetic_check_cells(manifest.input_size)
                checked_on = f"{len(images)} synthetic cells (seed 0)"
            exports["onnx"], record = make_onnx_export(load_keras(path), Path(tmp), images, checked_on)
            manifest = manifest.model_copy(update={"exports": {"onnx": record}})
        Registry(store, settings).publish(path, manifest, pictures, exports)
    return manifest
