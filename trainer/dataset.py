"""C-NMC data sets: find the cells in any mirror's layout, parse subject ids, split by subject.

Layouts understood (README.md, "Training on the real C-NMC 2019 data"):

- folds: any directory named ``fold_<k>`` that holds ``all/`` and/or ``hem/``, wherever it sits in the tree
  (``C-NMC_training_data/fold_0/all``, Kaggle's ``C-NMC_Leukemia/training_data/fold_0/all``, the nested
  ``training_data/fold_0/fold_0/all``: the innermost ``fold_<k>`` names the fold);
- a folder that directly holds ``all/`` and ``hem/`` with no fold (e.g. ``shared/data/cnmc-sample``);
- the preliminary test set: flat ``1.bmp ...`` plus a CSV ``Patient_ID,new_names,labels``.

Labels: 1 = ``all`` (malignant, the positive class everywhere), 0 = ``hem`` (normal).
Only image headers are read here; pixels are decoded later by core.imaging.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import AllscoreError
from core.imaging import ALLOWED_FORMATS, MIN_SIDE

log = logging.getLogger(__name__)

LABEL_ALL = 1
LABEL_HEM = 0
CLASS_NAMES = ("hem", "all")  # indexed by label: all (malignant) = 1 is the positive class
CLASS_DIRS = {"all": LABEL_ALL, "hem": LABEL_HEM}
IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
PRELIM_COLUMNS = ("patient_id", "new_names", "labels")

# How many skipped files one warning names before it summarises the rest.
_WARN_NAMES = 20
# Operating-system droppings that are not data and not worth a warning.
_IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
_IGNORED_DIRS = frozenset({"__macosx"})

_CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.(bmp|png|jpe?g|tiff?)$", re.IGNORECASE)
# Crops cut from fields by `allscore segment`: UID_<slide>_<field>_<cell>.bmp; the class is the folder's.
_SEGMENT_NAME = re.compile(r"^UID_([A-Za-z0-9-]+)_(\d+)_(\d+)\.(bmp|png)$", re.IGNORECASE)
_FOLD_DIR = re.compile(r"^fold_(\d+)$", re.IGNORECASE)


class DatasetError(AllscoreError):
    """A data set that cannot be found, parsed or split as asked."""


@dataclass(frozen=True)
class CellRecord:
    """One cell image: where it is, its label (1 = all, 0 = hem), its subject and fold when known."""

    path: Path
    label: int | None
    subject: str | None
    fold: str | None


@dataclass
class Dataset:
    """The cells of a data set, the files that were skipped (with why) and notes for the user."""

    cells: list[CellRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    root: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def subjects(self) -> list[str]:
        """Distinct subject ids, naturally sorted (2 before 10, malignant ids before H ids)."""
        return sorted({c.subject for c in self.cells if c.subject is not None}, key=subject_sort_key)

    @property
    def folds(self) -> list[str]:
        """Distinct fold ids ("0", "1", ...), naturally sorted."""
        return sorted({c.fold for c in self.cells if c.fold is not None}, key=_natural_key)

    @property
    def labels(self) -> np.ndarray:
        """Labels as an int64 array (1 = all); raises DatasetError if any cell is unlabelled."""
        if any(c.label is None for c in self.cells):
            raise DatasetError(f"{self.root}: some cells have no label; this data set can be scored, not evaluated")
        return np.array([c.label for c in self.cells], dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        """The image paths, in cell order."""
        return [c.path for c in self.cells]

    def by_subject(self) -> dict[str, list[CellRecord]]:
        """Cells grouped by subject id (cells without a subject are left out)."""
        groups: dict[str, list[CellRecord]] = defaultdict(list)
        for cell in self.cells:
            if cell.subject is not None:
                groups[cell.subject].append(cell)
        return {s: groups[s] for s in sorted(groups, key=subject_sort_key)}

    def class_counts(self) -> dict[str, int]:
        """Number of cells per class name ("all", "hem"; unlabelled cells are not counted)."""
        counts = Counter(c.label for c in self.cells)
        return {name: counts.get(label, 0) for label, name in reversed(list(enumerate(CLASS_NAMES)))}

    def subset(self, cells: Iterable[CellRecord]) -> Dataset:
        """A data set of the given cells with this one's root (skipped files and notes stay here)."""
        return Dataset(cells=list(cells), root=self.root)


def subject_sort_key(subject: str) -> tuple[int, int, str]:
    """Sort key for subject ids: malignant ids numerically, then healthy H ids numerically."""
    healthy = subject[:1].upper() == "H"
    digits = subject[1:] if healthy else subject
    return (int(healthy), int(digits) if digits.isdigit() else -1, subject)


def _natural_key(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (1 << 30, text)


def parse_cnmc_name(name: str) -> tuple[str, int]:
    """Parse ``UID_P_N_C_all.bmp`` / ``UID_HP_N_C_hem.bmp`` into (subject, label); H is in the subject."""
    base = Path(name).name
    match = _CNMC_NAME.match(base)
    if match is None:
        raise DatasetError(
            f"{name}: not a C-NMC cell name; expected UID_<subject>_<image>_<cell>_<all|hem>.bmp "
            "(e.g. UID_54_33_1_all.bmp or UID_H11_2_1_hem.bmp)"
        )
    subject = match.group(1).upper()  # 'h11' and 'H11' are the same healthy subject
    return subject, CLASS_DIRS[match.group(4).lower()]


def discover(root: Path, *, check_images: bool = True) -> Dataset:
    """Find the labelled cells under root in any C-NMC mirror layout (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: not a folder; point at a C-NMC data set (fold_<k>/all|hem, all/ + hem/, or "
            "the preliminary test set's folder with its CSV)"
        )
    class_roots, prelim_csvs = _walk(root)
    skipped: list[tuple[Path, str]] = []
    notes: list[str] = []
    cells: list[CellRecord] = []
    if class_roots:
        for class_root, fold in class_roots:
            cells.extend(_read_class_root(class_root, fold, skipped))
        # A held-out test set must not leak into training by sitting next to the folds.
        notes.extend(
            f"preliminary test set {csv_path} not included; point at it to evaluate on it" for csv_path in prelim_csvs
        )
    elif prelim_csvs:
        for csv_path in prelim_csvs:
            cells.extend(_read_prelim(csv_path, None, skipped))
    else:
        raise DatasetError(
            f"{root}: no C-NMC data found; expected fold_<k>/all|hem folders, a folder holding all/ and "
            "hem/, or a CSV with columns Patient_ID,new_names,labels"
        )
    return _finish(root, cells, skipped, notes, check_images=check_images)


def load_prelim(csv_path: Path, images_dir: Path | None = None, *, check_images: bool = True) -> Dataset:
    """Load the preliminary test set from its ``Patient_ID,new_names,labels`` CSV (label 1 = all)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such CSV file")
    if not _is_prelim_csv(csv_path):
        raise DatasetError(f"{csv_path}: not a preliminary-test CSV; its header must be Patient_ID,new_names,labels")
    skipped: list[tuple[Path, str]] = []
    cells = _read_prelim(csv_path, images_dir, skipped)
    return _finish(csv_path.parent, cells, skipped, [], check_images=check_images)


def _walk(root: Path) -> tuple[list[tuple[Path, str | None]], list[Path]]:
    """Folders that hold all/ or hem/ (with their fold id), and preliminary-test CSVs, in sorted order."""
    class_roots: list[tuple[Path, str | None]] = []
    prelim_csvs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _IGNORED_DIRS)
        if any(d.lower() in CLASS_DIRS for d in dirnames):
            class_roots.append((here, _fold_of(here, root)))
            # The class folders are read by _read_class_root; nothing below them is another layout.
            dirnames[:] = [d for d in dirnames if d.lower() not in CLASS_DIRS]
        prelim_csvs.extend(
            here / f for f in sorted(filenames) if f.lower().endswith(".csv") and _is_prelim_csv(here / f)
        )
    return class_roots, prelim_csvs


def _fold_of(directory: Path, root: Path) -> str | None:
    """The innermost fold_<k> among directory and its ancestors up to root (fold_0/fold_0 is one fold)."""
    for candidate in (directory, *directory.parents):
        match = _FOLD_DIR.match(candidate.name)
        if match is not None:
            return str(int(match.group(1)))
        if candidate == root:
            break
    return None


def _read_class_root(class_root: Path, fold: str | None, skipped: list[tuple[Path, str]]) -> list[CellRecord]:
    cells: list[CellRecord] = []
    class_dirs = sorted(d for d in class_root.iterdir() if d.is_dir() and d.name.lower() in CLASS_DIRS)
    for class_dir in class_dirs:
        folder_label = CLASS_DIRS[class_dir.name.lower()]
        for path in sorted(p for p in class_dir.iterdir() if p.is_file()):
            if path.name.startswith(".") or path.name.lower() in _IGNORED_FILES:
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((path, f"not an image file (suffix {path.suffix or 'none'!r})"))
                continue
            segment = _SEGMENT_NAME.match(path.name)
            if segment is not None:
                cells.append(CellRecord(path=path, label=folder_label, subject=segment.group(1), fold=fold))
                continue
            try:
                subject, name_label = parse_cnmc_name(path.name)
            except DatasetError:
                if fold is not None:
                    # Fold data is for training, where a cell without a subject would break the split.
                    skipped.append((path, "name does not parse as UID_<subject>_<image>_<cell>_<all|hem>"))
                    continue
                cells.append(CellRecord(path=path, label=folder_label, subject=None, fold=None))
                continue
            if name_label != folder_label:
                skipped.append(
                    (
                        path,
                        f"name says {CLASS_NAMES[name_label]} but it is in {class_dir.name}/ (label unclear)",
                    )
                )
                continue
            cells.append(CellRecord(path=path, label=folder_label, subject=subject, fold=fold))
    return cells


def _is_prelim_csv(path: Path) -> bool:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return set(PRELIM_COLUMNS) <= {h.strip().lower() for h in header}


def _read_prelim(csv_path: Path, images_dir: Path | None, skipped: list[tuple[Path, str]]) -> list[CellRecord]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [dict(zip(header, (v.strip() for v in row), strict=False)) for row in reader if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read the CSV ({exc})") from exc
    names = [row.get("new_names", "") for row in rows]
    folder = Path(images_dir) if images_dir is not None else _find_images_dir(csv_path, names)
    cells: list[CellRecord] = []
    for line, row in enumerate(rows, start=2):
        new_name, original = row.get("new_names", ""), row.get("patient_id", "")
        path = folder / new_name
        label = _prelim_label(row.get("labels", ""))
        if not new_name or label is None:
            skipped.append((csv_path, f"line {line}: needs new_names and a label 0/1 (got {row})"))
            continue
        if not path.is_file():
            skipped.append((path, f"listed in {csv_path.name} line {line} but missing"))
            continue
        try:
            subject, name_label = parse_cnmc_name(original)
        except DatasetError:
            cells.append(CellRecord(path=path, label=label, subject=None, fold=None))
            continue
        if name_label != label:
            skipped.append((path, f"CSV label {label} disagrees with its original name {original}"))
            continue
        cells.append(CellRecord(path=path, label=label, subject=subject, fold=None))
    return cells


def _prelim_label(value: str) -> int | None:
    text = value.strip().lower()
    if text in ("1", "all"):
        return LABEL_ALL
    if text in ("0", "hem"):
        return LABEL_HEM
    return None


def _find_images_dir(csv_path: Path, names: list[str]) -> Path:
    """The folder holding the CSV's images: beside it, named after it, or one level down."""
    parent = csv_path.parent
    stem = csv_path.stem.removesuffix("_labels")
    candidates = [parent / stem, parent, *sorted(d for d in parent.iterdir() if d.is_dir())]
    wanted = set(names)
    best, best_hits = None, 0
    for candidate in candidates:
        if not candidate.is_dir():
            continue
        hits = len(wanted & set(os.listdir(candidate)))
        if hits > best_hits:
            best, best_hits = candidate, hits
    if best is None:
        raise DatasetError(
            f"{csv_path}: none of the images it lists (e.g. {names[:1]}) are beside it or in a folder next "
            "to it; pass images_dir"
        )
    return best


def _image_problem(path: Path) -> str | None:
    """Why the image at path cannot be used, from its header alone, or None if it looks fine."""
    try:
        # Only the formats decoding accepts, so a file kept here is one decoding will try.
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"
    if min(width, height) < MIN_SIDE:
        return f"too small to hold a cell ({width}x{height})"
    return None


def _finish(
    root: Path,
    cells: list[CellRecord],
    skipped: list[tuple[Path, str]],
    notes: list[str],
    *,
    check_images: bool,
) -> Dataset:
    kept: list[CellRecord] = []
    seen: dict[str, Path] = {}
    for cell in cells:
        # Mirrors copied side by side hold the same cell twice; C-NMC names are unique, so the name decides.
        key = cell.path.name.lower() if cell.subject is not None and cell.fold is not None else str(cell.path)
        if key in seen:
            skipped.append((cell.path, f"duplicate of {seen[key]}"))
            continue
        problem = _image_problem(cell.path) if check_images else None
        if problem is not None:
            skipped.append((cell.path, problem))
            continue
        seen[key] = cell.path
        kept.append(cell)
    no_subject = [c for c in kept if c.subject is None]
    if no_subject:
        notes.append(
            f"{len(no_subject)} of {len(kept)} cells have no subject id in their names "
            f"(e.g. {no_subject[0].path.name}): they can be evaluated but not split by subject"
        )
    if skipped:
        shown = "; ".join(f"{path} ({why})" for path, why in skipped[:_WARN_NAMES])
        more = f"; and {len(skipped) - _WARN_NAMES} more" if len(skipped) > _WARN_NAMES else ""
        log.warning("%s: skipped %d files: %s%s", root, len(skipped), shown, more)
    for note in notes:
        log.info("%s: %s", root, note)
    if not kept:
        raise DatasetError(f"{root}: no usable cell images found ({len(skipped)} files skipped, see the warning)")
    ds = Dataset(cells=kept, skipped=skipped, root=root, notes=notes)
    log.info(
        "%s: %d cells (%s), %d subjects, folds %s",
        root,
        len(ds),
        ds.class_counts(),
        len(ds.subjects),
        ds.folds,
    )
    return ds


def split_by_subject(
    ds: Dataset,
    *,
    val_fold: str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """Split into (train, validation) by subject: a fold, a stratified fraction of subjects, or a default."""
    if val_fold is not None and val_fraction is not None:
        raise DatasetError("give a validation fold or a validation fraction, not both")
    missing = [c for c in ds.cells if c.subject is None]
    if missing:
        raise DatasetError(
            f"{ds.root}: {len(missing)} cells have no subject id (e.g. {missing[0].path.name}); a split by "
            "subject needs C-NMC names (UID_<subject>_...) or the preliminary CSV; evaluate this set instead "
            "of training on it"
        )
    if val_fold is None and val_fraction is None:
        if ds.folds:
            val_fold = ds.folds[-1]
        else:
            val_fraction = 0.2
    if val_fold is not None:
        train, val = _split_fold(ds, val_fold)
        how = f"fold {val_fold}"
    else:
        assert val_fraction is not None
        train, val = _split_fraction(ds, val_fraction, seed)
        how = f"{val_fraction:.0%} of subjects (seed {seed})"
    _require_both_classes(train, "training", how)
    _require_both_classes(val, "validation", how)
    log.info("validation = %s: subjects %s; training subjects %s", how, val.subjects, train.subjects)
    return train, val


def _split_fold(ds: Dataset, val_fold: str) -> tuple[Dataset, Dataset]:
    match = _FOLD_DIR.match(str(val_fold))
    fold = str(int(match.group(1))) if match else str(val_fold).strip()
    if fold not in ds.folds:
        raise DatasetError(
            f"{ds.root}: no fold {val_fold!r}; folds found: {ds.folds or 'none'} "
            "(choose one of them or use a validation fraction)"
        )
    val = [c for c in ds.cells if c.fold == fold]
    train = [c for c in ds.cells if c.fold != fold]
    shared = sorted({c.subject for c in val} & {c.subject for c in train}, key=lambda s: subject_sort_key(s or ""))
    if shared:
        raise DatasetError(
            f"{ds.root}: subjects {shared} have cells in fold {fold} and in other folds; a fold split would "
            "put them on both sides, so use a validation fraction instead"
        )
    return ds.subset(train), ds.subset(val)


def _split_fraction(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    groups = ds.by_subject()
    # C-NMC subjects are all-patients or healthy, so a subject's class is its cells' majority label.
    by_class: dict[int, list[str]] = defaultdict(list)
    for subject, cells in groups.items():
        by_class[int(np.mean([c.label for c in cells]) >= 0.5)].append(subject)
    rng = np.random.default_rng(seed)
    val_subjects: set[str] = set()
    for label in sorted(by_class):
        subjects = by_class[label]
        order = rng.permutation(len(subjects))
        # At least one per class on the validation side, at least one left for training.
        n_val = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)
        val_subjects.update(subjects[i] for i in order[:n_val])
    val = [c for c in ds.cells if c.subject in val_subjects]
    train = [c for c in ds.cells if c.subject not in val_subjects]
    return ds.subset(train), ds.subset(val)


def _require_both_classes(side: Dataset, name: str, how: str) -> None:
    counts = side.class_counts()
    absent = [cls for cls, n in counts.items() if n == 0]
    if absent:
        raise DatasetError(
            f"the {name} side of the split ({how}) has no {' or '.join(absent)} cells "
            f"(subjects {side.subjects}); choose another validation fold, or a validation fraction, and make "
            "sure the data set has at least two subjects of each class"
        )


__all__ = [
    "CLASS_NAMES",
    "LABEL_ALL",
    "LABEL_HEM",
    "CellRecord",
    "Dataset",
    "DatasetError",
    "discover",
    "load_prelim",
    "parse_cnmc_name",
    "split_by_subject",
    "subject_sort_key",
]


# A data set may say the scale of its crops (um per pixel at 450x450) in this file at its root: `allscore data
# synth` and `allscore segment --out` write it. Without it the crops are taken to be at the C-NMC scale.
SCALE_FILE = "allscore-data.json"


def data_scale(root: Path) -> tuple[float, str]:
    """The um per pixel of a data set's crops, and where that figure comes from."""
    import json

    from core.segment import CNMC_UM_PER_PX

    folder = root if root.is_dir() else root.parent
    path = folder / SCALE_FILE
    if path.is_file():
        try:
            info = json.loads(path.read_text())
            value = float(info["um_per_px"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: expected JSON with a number um_per_px ({exc}); fix or delete it") from exc
        if not 0 < value <= 100:
            raise DatasetError(f"{path}: um_per_px {value} must be above 0 and at most 100")
        return value, str(info.get("source") or path)
    return CNMC_UM_PER_PX, "the C-NMC scale estimate (core.segment.CNMC_UM_PER_PX)"


def write_data_scale(root: Path, um_per_px: float, source: str) -> Path:
    """Record the scale of a data set's crops at its root (read back by data_scale)."""
    import json

    path = Path(root) / SCALE_FILE
    path.write_text(json.dumps({"um_per_px": um_per_px, "source": source}, indent=2) + "\n")
    return path
