"""The data layer: C-NMC layouts of every mirror, subject ids, the preliminary CSV, splits by subject."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CNMC_SAMPLE
from trainer.dataset import CellRecord, Dataset, DatasetError, parse_cnmc_name, split_by_subject
from trainer.discovery import discover, load_prelim

SAMPLE = CNMC_SAMPLE  # the 24 real C-NMC cells kept in tests/data/cnmc

# Three folds with disjoint subjects, both classes in each; 11 and H11 are different people.
FOLD_SUBJECTS = {"0": ["1", "11", "H11"], "1": ["2", "H2"], "2": ["3", "H3", "H4"]}
CELLS_PER_SUBJECT = 2


def _bmp(path: Path, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (value, value // 2, value)).save(path, "BMP")
    return path


def _cls(subject: str) -> str:
    return "hem" if subject.startswith("H") else "all"


def _write_folds(fold_dir_of: dict[str, Path]) -> dict[str, list[Path]]:
    """C-NMC fold contents under the given fold folders; returns the files written per fold."""
    written: dict[str, list[Path]] = {}
    for fold, subjects in FOLD_SUBJECTS.items():
        written[fold] = [
            _bmp(fold_dir_of[fold] / _cls(s) / f"UID_{s}_{n}_1_{_cls(s)}.bmp")
            for s in subjects
            for n in range(1, CELLS_PER_SUBJECT + 1)
        ]
    return written


LAYOUTS = {
    "tcia": lambda root, k: root / "C-NMC_training_data" / f"fold_{k}",
    "kaggle": lambda root, k: root / "C-NMC_Leukemia" / "training_data" / f"fold_{k}",
    "nested": lambda root, k: root / "training_data" / f"fold_{k}" / f"fold_{k}",
}


def _write_prelim(folder: Path, csv_path: Path) -> dict[str, tuple[str, int]]:
    """A preliminary test set: flat numbered images plus the CSV; returns new name -> (subject, label)."""
    rows = [
        ("UID_54_33_1_all.bmp", "1.bmp", 1),
        ("UID_H20_7_2_hem.bmp", "2.bmp", 0),
        ("UID_54_9_1_all.bmp", "3.bmp", 1),
    ]
    for _, new, _ in rows:
        _bmp(folder / new)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("Patient_ID,new_names,labels\n" + "".join(f"{o},{n},{lab}\n" for o, n, lab in rows))
    return {n: (parse_cnmc_name(o)[0], lab) for o, n, lab in rows}


@pytest.mark.parametrize(
    ("name", "subject", "label"),
    [
        ("UID_11_3_2_all.bmp", "11", 1),
        ("UID_H11_3_2_hem.bmp", "H11", 0),
        ("UID_H11_3_2_hem.BMP", "H11", 0),
        ("UID_54_33_1_all.BMP", "54", 1),
        ("/some/folder/UID_h7_1_1_hem.bmp", "H7", 0),
    ],
)
def test_parse_cnmc_name(name: str, subject: str, label: int) -> None:
    assert parse_cnmc_name(name) == (subject, label)


def test_11_and_h11_are_different_subjects() -> None:
    assert parse_cnmc_name("UID_11_1_1_all.bmp")[0] != parse_cnmc_name("UID_H11_1_1_hem.bmp")[0]


@pytest.mark.parametrize("name", ["all_3.bmp", "UID_11_3_all.bmp", "UID_11_3_2_blast.bmp", "UID_11_3_2_all.txt", ""])
def test_parse_cnmc_name_rejects_other_names_naming_the_file(name: str) -> None:
    with pytest.raises(DatasetError, match="not a C-NMC cell name"):
        parse_cnmc_name(name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_discover_each_mirror_layout(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    written = _write_folds({k: LAYOUTS[layout](root, k) for k in FOLD_SUBJECTS})

    ds = discover(root)

    assert ds.folds == ["0", "1", "2"]  # nested fold_0/fold_0 is one fold, not two
    assert ds.skipped == []
    assert len(ds) == sum(len(files) for files in written.values())
    for fold, files in written.items():
        in_fold = {c.path for c in ds.cells if c.fold == fold}
        assert in_fold == set(files)
        assert {c.subject for c in ds.cells if c.fold == fold} == set(FOLD_SUBJECTS[fold])
    for cell in ds.cells:
        assert cell.label == (1 if cell.path.parent.name == "all" else 0)  # all = malignant = 1
        assert cell.label == (0 if cell.subject is not None and cell.subject.startswith("H") else 1)
    assert ds.labels.tolist() == [c.label for c in ds.cells]
    assert set(ds.by_subject()) == {"1", "11", "H11", "2", "H2", "3", "H3", "H4"}
    assert len(ds.by_subject()["11"]) == len(ds.by_subject()["H11"]) == CELLS_PER_SUBJECT


def test_discover_from_inside_a_single_fold(tmp_path: Path) -> None:
    _write_folds({k: tmp_path / "data" / f"fold_{k}" for k in FOLD_SUBJECTS})
    ds = discover(tmp_path / "data" / "fold_1")
    assert ds.folds == ["1"]
    assert ds.subjects == ["2", "H2"]


def test_discover_mirrors_side_by_side_keeps_each_cell_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    written = _write_folds({k: LAYOUTS["tcia"](root, k) for k in FOLD_SUBJECTS})
    _write_folds({k: LAYOUTS["kaggle"](root, k) for k in FOLD_SUBJECTS})
    ds = discover(root)
    assert len(ds) == sum(len(files) for files in written.values())
    assert len(ds.skipped) == len(ds) and all("duplicate" in why for _, why in ds.skipped)


@pytest.mark.parametrize("csv_inside", [False, True], ids=["kaggle-csv-beside", "tcia-csv-inside"])
def test_discover_preliminary_test_set(tmp_path: Path, csv_inside: bool) -> None:
    parent = tmp_path / "validation_data"
    folder = parent / "C-NMC_test_prelim_phase_data"
    csv_path = (folder if csv_inside else parent) / "C-NMC_test_prelim_phase_data_labels.csv"
    truth = _write_prelim(folder, csv_path)

    for where in (parent, folder) if csv_inside else (parent,):
        ds = discover(where)
        assert {c.path.name: (c.subject, c.label) for c in ds.cells} == truth
        assert ds.folds == []
        assert ds.subjects == ["54", "H20"]

    ds = load_prelim(csv_path)
    assert {c.path.name: (c.subject, c.label) for c in ds.cells} == truth


def test_load_prelim_skips_missing_images_and_disagreeing_labels(tmp_path: Path) -> None:
    folder = tmp_path / "prelim"
    csv_path = tmp_path / "labels.csv"
    _bmp(folder / "1.bmp")
    _bmp(folder / "2.bmp")
    csv_path.write_text(
        "Patient_ID,new_names,labels\n"
        "UID_5_1_1_all.bmp,1.bmp,1\n"
        "UID_5_1_2_all.bmp,2.bmp,0\n"  # the CSV and the original name disagree
        "UID_H6_1_1_hem.bmp,9.bmp,0\n"  # listed but not there
    )
    ds = load_prelim(csv_path, folder)
    assert [c.path.name for c in ds.cells] == ["1.bmp"]
    reasons = {p.name: why for p, why in ds.skipped}
    assert "disagrees" in reasons["2.bmp"]
    assert "missing" in reasons["9.bmp"]


def test_preliminary_set_beside_the_folds_is_not_mixed_into_training(tmp_path: Path) -> None:
    root = tmp_path / "C-NMC_Leukemia"
    _write_folds({k: root / "training_data" / f"fold_{k}" for k in FOLD_SUBJECTS})
    prelim = root / "validation_data"
    _write_prelim(prelim / "C-NMC_test_prelim_phase_data", prelim / "C-NMC_test_prelim_phase_data_labels.csv")
    ds = discover(root)
    assert all(c.fold is not None for c in ds.cells)
    assert any("preliminary" in note for note in ds.notes)


def test_bad_files_are_skipped_and_named_in_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    _write_folds({k: root / f"fold_{k}" for k in FOLD_SUBJECTS})
    all_dir = root / "fold_0" / "all"
    bad = {
        "UID_1_9_1_all.bmp": b"",  # zero bytes
        "UID_1_9_2_all.bmp": b"this is not an image",
        "UID_1_9_3_all.bmp": Path(_bmp(tmp_path / "x.bmp")).read_bytes()[:20],  # truncated header
        "copy of cell.bmp": None,  # name does not parse
        "UID_H11_9_4_hem.bmp": None,  # a hem cell filed under all/
        "notes.txt": b"hello",
    }
    for name, data in bad.items():
        if data is None:
            _bmp(all_dir / name)
        else:
            (all_dir / name).write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="trainer.dataset"):
        ds = discover(root)

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"skipped {len(bad)} files" in message
    for name in bad:
        assert name in message
    assert {p.name for p, _ in ds.skipped} == set(bad)
    assert not {c.path.name for c in ds.cells} & set(bad)
    reasons = {p.name: why for p, why in ds.skipped}
    assert "unreadable" in reasons["UID_1_9_1_all.bmp"]
    assert "says hem" in reasons["UID_H11_9_4_hem.bmp"]


def test_discover_rejects_a_folder_without_cnmc_data(tmp_path: Path) -> None:
    _bmp(tmp_path / "data" / "1.bmp")
    with pytest.raises(DatasetError, match="no C-NMC data found"):
        discover(tmp_path / "data")
    with pytest.raises(DatasetError, match="not a folder"):
        discover(tmp_path / "absent")


def test_class_folders_without_folds_load_unknown_subjects_with_a_note(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _bmp(root / "all" / "all_1.bmp")
    _bmp(root / "all" / "UID_7_1_1_all.bmp")
    _bmp(root / "hem" / "normal_1.bmp")
    ds = discover(root)
    assert sorted((c.path.name, c.subject, c.label) for c in ds.cells) == [
        ("UID_7_1_1_all.bmp", "7", 1),
        ("all_1.bmp", None, 1),
        ("normal_1.bmp", None, 0),
    ]
    assert any("no subject id" in note for note in ds.notes)
    with pytest.raises(DatasetError, match="no subject id"):
        split_by_subject(ds)


def _folds_dataset(tmp_path: Path) -> Dataset:
    _write_folds({k: tmp_path / "data" / f"fold_{k}" for k in FOLD_SUBJECTS})
    return discover(tmp_path / "data")


@pytest.mark.parametrize("val_fold", ["0", "1", "2", "fold_2"])
def test_split_by_fold_never_shares_a_subject(tmp_path: Path, val_fold: str) -> None:
    ds = _folds_dataset(tmp_path)
    train, val = split_by_subject(ds, val_fold=val_fold)
    fold = val_fold.removeprefix("fold_")
    assert set(val.subjects) == set(FOLD_SUBJECTS[fold])
    assert not set(train.subjects) & set(val.subjects)
    assert len(train) + len(val) == len(ds)


def test_default_split_holds_out_the_last_fold(tmp_path: Path) -> None:
    train, val = split_by_subject(_folds_dataset(tmp_path))
    assert val.folds == ["2"] and train.folds == ["0", "1"]


def test_split_by_unknown_fold_says_which_exist(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"folds found: \['0', '1', '2'\]"):
        split_by_subject(_folds_dataset(tmp_path), val_fold="7")


def _subjects_dataset(n_all: int, n_hem: int, cells: int = 3) -> Dataset:
    records = [
        CellRecord(
            path=Path(f"/x/UID_{s}_{i}_1_{'hem' if s.startswith('H') else 'all'}.bmp"),
            label=0 if s.startswith("H") else 1,
            subject=s,
            fold=None,
        )
        for s in [str(i) for i in range(1, n_all + 1)] + [f"H{i}" for i in range(1, n_hem + 1)]
        for i in range(cells)
    ]
    return Dataset(cells=records, root=Path("/x"))


@pytest.mark.parametrize("seed", range(5))
def test_split_by_fraction_never_shares_a_subject_and_stratifies(seed: int) -> None:
    ds = _subjects_dataset(n_all=10, n_hem=5)
    train, val = split_by_subject(ds, val_fraction=0.2, seed=seed)
    assert not set(train.subjects) & set(val.subjects)
    assert set(train.subjects) | set(val.subjects) == set(ds.subjects)
    assert val.class_counts()["all"] > 0 and val.class_counts()["hem"] > 0
    assert train.class_counts()["all"] > 0 and train.class_counts()["hem"] > 0
    assert len(val.subjects) == 3  # 20% of 10 malignant + 20% of 5 healthy subjects
    again = split_by_subject(ds, val_fraction=0.2, seed=seed)[1]
    assert again.subjects == val.subjects


def test_split_by_fraction_depends_on_the_seed() -> None:
    ds = _subjects_dataset(n_all=10, n_hem=10)
    chosen = {tuple(split_by_subject(ds, val_fraction=0.3, seed=s)[1].subjects) for s in range(5)}
    assert len(chosen) > 1


def test_default_split_without_folds_is_a_fifth_of_subjects() -> None:
    train, val = split_by_subject(_subjects_dataset(n_all=10, n_hem=10))
    assert len(val.subjects) == 4 and len(train.subjects) == 16


def test_split_refuses_a_side_without_both_classes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="has no hem cells"):
        split_by_subject(_subjects_dataset(n_all=4, n_hem=1), val_fraction=0.5)
    root = tmp_path / "data"
    _bmp(root / "fold_0" / "all" / "UID_1_1_1_all.bmp")
    _bmp(root / "fold_0" / "hem" / "UID_H1_1_1_hem.bmp")
    _bmp(root / "fold_1" / "all" / "UID_2_1_1_all.bmp")
    with pytest.raises(DatasetError, match=r"validation side .* has no hem cells"):
        split_by_subject(discover(root), val_fold="1")


def test_fold_split_refuses_a_subject_in_two_folds(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _write_folds({k: root / f"fold_{k}" for k in FOLD_SUBJECTS})
    _bmp(root / "fold_2" / "all" / "UID_1_99_1_all.bmp")  # subject 1 also lives in fold 0
    ds = discover(root)
    with pytest.raises(DatasetError, match=r"subjects \['1'\] have cells in fold 2 and in other folds"):
        split_by_subject(ds, val_fold="2")
    train, val = split_by_subject(ds, val_fraction=0.3)
    assert not set(train.subjects) & set(val.subjects)


def test_split_refuses_both_fold_and_fraction(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not both"):
        split_by_subject(_folds_dataset(tmp_path), val_fold="0", val_fraction=0.2)


def test_real_cnmc_sample() -> None:
    ds = discover(SAMPLE)
    assert ds.class_counts() == {"all": 14, "hem": 10}
    assert ds.skipped == []
    assert all(c.subject is None for c in ds.cells)  # all_K / normal_K / prelim_N carry no subject id
    assert np.array_equal(ds.labels, [1 if c.path.parent.name == "all" else 0 for c in ds.cells])


def test_data_layer_does_not_import_tensorflow() -> None:
    code = "import sys, trainer.dataset, trainer.synth; sys.exit('tensorflow' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        check=False,
    )
    assert done.returncode == 0
