"""Finding the cells of a C-NMC data set on disk: the layouts each mirror uses, the cells' labels and subjects from
their folders and names or from the preliminary test set's CSV, and what is skipped (duplicates, unreadable or
too-small images, unclear labels), warned about once per data set. The records and the data set they make are
trainer.dataset's.

Layouts understood (README.md, "Training on the real C-NMC 2019 data"):

- folds: any directory named ``fold_<k>`` that holds ``all/`` and/or ``hem/``, wherever it sits in the tree
  (``C-NMC_training_data/fold_0/all``, Kaggle's ``C-NMC_Leukemia/training_data/fold_0/all``, the nested
  ``training_data/fold_0/fold_0/all``: the innermost ``fold_<k>`` names the fold);
- a folder that directly holds ``all/`` and ``hem/`` with no fold (e.g. ``shared/data/cnmc-sample``);
- the preliminary test set: flat ``1.bmp ...`` plus a CSV ``Patient_ID,new_names,labels``.

Only image headers are read here; pixels are decoded later by core.imaging.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from PIL import Image

from core.imaging import ALLOWED_FORMATS, MIN_SIDE
from trainer.dataset import (
    CLASS_DIRS,
    CLASS_NAMES,
    FOLD_DIR,
    IMAGE_SUFFIXES,
    LABEL_ALL,
    LABEL_HEM,
    PRELIM_COLUMNS,
    CellRecord,
    Dataset,
    DatasetError,
    parse_cnmc_name,
)

# Logged as trainer.dataset, the name discovery has always logged under (log filters and tests name it).
log = logging.getLogger("trainer.dataset")

# How many skipped files one warning names before it summarises the rest.
_WARN_NAMES = 20
# Operating-system droppings that are not data and not worth a warning.
_IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
_IGNORED_DIRS = frozenset({"__macosx"})
# Crops cut from fields by `allscore segment`: UID_<slide>_<field>_<cell>.bmp; the class is the folder's.
_SEGMENT_NAME = re.compile(r"^UID_([A-Za-z0-9-]+)_(\d+)_(\d+)\.(bmp|png)$", re.IGNORECASE)


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
        match = FOLD_DIR.match(candidate.name)
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
