"""C-NMC data sets: the cell records and the data set they make, subject ids, the split by subject, the scale file.
Finding the cells in a mirror's layout is trainer.discovery's.

Labels: 1 = ``all`` (malignant, the positive class everywhere), 0 = ``hem`` (normal).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import AllscoreError

log = logging.getLogger(__name__)

LABEL_ALL = 1
LABEL_HEM = 0
CLASS_NAMES = ("hem", "all")  # indexed by label: all (malignant) = 1 is the positive class
CLASS_DIRS = {"all": LABEL_ALL, "hem": LABEL_HEM}
IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
PRELIM_COLUMNS = ("patient_id", "new_names", "labels")

_CNMC_NAME = re.compile(r"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.(bmp|png|jpe?g|tiff?)$", re.IGNORECASE)
FOLD_DIR = re.compile(r"^fold_(\d+)$", re.IGNORECASE)


class DatasetError(AllscoreError):
    """A data set that cannot be found, parsed or split as asked."""


@dataclass(frozen=True)
class CellRecord:
    """One cell image: where it is, its label (1 = all, 0 = hem), its subject and fold when known."""

    path: Path
    label: int | None
    subject: str | None
    fold: str | None


def group_by_subject(cells: Iterable[CellRecord]) -> dict[str, list[CellRecord]]:
    """Cells grouped by subject id, subjects in subject order (cells without a subject are left out)."""
    groups: dict[str, list[CellRecord]] = defaultdict(list)
    for cell in cells:
        if cell.subject is not None:
            groups[cell.subject].append(cell)
    return {s: groups[s] for s in sorted(groups, key=subject_sort_key)}


def subject_classes(groups: dict[str, list[CellRecord]]) -> dict[str, int]:
    """Each subject's class: the majority label of its labelled cells (C-NMC subjects are ALL patients or healthy)."""
    return {
        s: int(np.mean(labels) >= 0.5)
        for s, cells in groups.items()
        if (labels := [c.label for c in cells if c.label is not None])
    }


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
        return group_by_subject(self.cells)

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
    match = FOLD_DIR.match(str(val_fold))
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
