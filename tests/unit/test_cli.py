"""The command line as scripts call it: train prints the reference last, evaluate --json, models, errors."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cli import run_allscore
from tests.helpers import CNMC_SAMPLE, cnmc_cells


def allscore(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_allscore(*args, env={"ALLSCORE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}, check=check)


def subject_of(cell: Path) -> str:
    """The subject of a C-NMC training cell: UID_<subject>_<image>_<cell>_<class>.bmp."""
    return cell.name.split("_")[1]


def assert_metrics_hold_together(metrics: dict[str, Any], cells: list[Path]) -> None:
    """The figures reported for `cells` (C-NMC layout: their class is their folder) agree with the cells and with
    each other: the confusion counts the cells and their classes, the rates and the weighted F1 are what it gives,
    and the per-subject accuracies add up to the cells called right."""
    cm = metrics["confusion"]
    tp, fp, tn, fn = cm["tp"], cm["fp"], cm["tn"], cm["fn"]
    n_all = sum(cell.parent.name == "all" for cell in cells)
    assert metrics["n_cells"] == len(cells) == tp + fp + tn + fn
    assert (tp + fn, tn + fp) == (n_all, len(cells) - n_all)
    assert metrics["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert metrics["specificity"] == pytest.approx(tn / (tn + fp))
    assert metrics["accuracy"] == pytest.approx((tp + tn) / len(cells))

    def f1(hits: int, false_calls: int, misses: int) -> float:
        return 2 * hits / (2 * hits + false_calls + misses) if hits + false_calls + misses else 0.0

    weighted = (f1(tp, fp, fn) * (tp + fn) + f1(tn, fn, fp) * (tn + fp)) / len(cells)
    assert metrics["weighted_f1"] == pytest.approx(weighted)
    assert 0.0 <= metrics["auc"] <= 1.0
    per_subject = Counter(subject_of(cell) for cell in cells)
    assert set(metrics["per_subject_accuracy"]) == set(per_subject)
    assert metrics["n_subjects"] == len(per_subject)
    right = sum(accuracy * per_subject[s] for s, accuracy in metrics["per_subject_accuracy"].items())
    assert right == pytest.approx(tp + tn)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("cli-home")
    result = allscore("train", str(synth_data), "--arch", "tiny", "--epochs", "2", "--name", "cli", home=home)
    ref = result.stdout.strip().splitlines()[-1]
    return home, ref


def test_train_prints_the_reference_last_and_records_the_split_and_its_metrics(
    trained: tuple[Path, str], synth_data: Path
) -> None:
    home, ref = trained
    assert ref.startswith("cli:")
    manifest = json.loads(allscore("models", "show", ref, home=home).stdout)
    assert manifest["positive_class"] == "all"
    assert not set(manifest["train_subjects"]) & set(manifest["val_subjects"])
    validation_cells = [c for c in synth_data.rglob("*.bmp") if subject_of(c) in manifest["val_subjects"]]
    assert_metrics_hold_together(manifest["validation"], validation_cells)
    assert manifest["sha256"] and manifest["tensorflow_version"] and manifest["keras_version"]
    # By default cells are scored as read (per-sample stain normalisation is `--stain-norm sample`).
    assert manifest["training"]["stain_norm"] == "none" and manifest["stain_norm"] is None


def test_evaluate_json_on_a_fold_and_on_the_real_cells(trained: tuple[Path, str], synth_data: Path) -> None:
    home, ref = trained
    manifest = json.loads(allscore("models", "show", ref, home=home).stdout)
    out = json.loads(allscore("evaluate", ref, str(synth_data / "fold_2"), "--json", home=home).stdout)
    assert (out["model"], out["threshold"], out["n_failed"]) == (ref, manifest["threshold"], 0)
    assert out["stain_norm"] == "none"
    assert_metrics_hold_together(out, sorted((synth_data / "fold_2").rglob("*.bmp")))
    cnmc_cells()
    real = json.loads(allscore("evaluate", ref, str(CNMC_SAMPLE), "--json", home=home).stdout)
    # The real cells are read and counted; no claim is made about how well a synthetic model does on them.
    assert real["n_cells"] == 24 and real["n_failed"] == 0
    real_cm = real["confusion"]
    assert real_cm["tp"] + real_cm["fn"] == len(list((CNMC_SAMPLE / "all").glob("*.bmp")))
    assert sum(real_cm.values()) == 24


def test_models_list_promote_and_a_clear_error(trained: tuple[Path, str]) -> None:
    home, ref = trained
    assert "cli@production" in allscore("models", "promote", ref, "production", home=home).stdout
    listing = allscore("models", "list", home=home).stdout
    assert ref in listing and "production" in listing
    bad = allscore("models", "show", "cli:nope", home=home, check=False)
    assert bad.returncode == 3  # refused (README, "Exit codes")
    assert "no model manifest" in bad.stderr and "Traceback" not in bad.stderr
