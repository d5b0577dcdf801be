"""The command line as scripts call it: train prints the reference last, evaluate --json, models, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CNMC_SAMPLE, cnmc_cells


def allscore(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ALLSCORE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "allscore", *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("cli-home")
    result = allscore("train", str(synth_data), "--arch", "tiny", "--epochs", "2", "--name", "cli", home=home)
    ref = result.stdout.strip().splitlines()[-1]
    return home, ref


def test_train_prints_the_reference_last_and_records_the_split(trained: tuple[Path, str]) -> None:
    home, ref = trained
    assert ref.startswith("cli:")
    manifest = json.loads(allscore("models", "show", ref, home=home).stdout)
    assert manifest["positive_class"] == "all"
    assert not set(manifest["train_subjects"]) & set(manifest["val_subjects"])
    assert manifest["validation"]["n_subjects"] == len(manifest["val_subjects"])
    for key in ("weighted_f1", "auc", "sensitivity", "specificity", "per_subject_accuracy", "confusion"):
        assert key in manifest["validation"]
    assert manifest["sha256"] and manifest["tensorflow_version"] and manifest["keras_version"]


def test_evaluate_json_on_a_fold_and_on_the_real_cells(trained: tuple[Path, str], synth_data: Path) -> None:
    home, ref = trained
    out = json.loads(allscore("evaluate", ref, str(synth_data / "fold_2"), "--json", home=home).stdout)
    for key in ("weighted_f1", "auc", "sensitivity", "specificity", "threshold", "n_cells", "n_subjects"):
        assert key in out
    assert out["n_subjects"] == len({p.name.split("_")[1] for p in (synth_data / "fold_2").rglob("*.bmp")})
    cnmc_cells()
    real = json.loads(allscore("evaluate", ref, str(CNMC_SAMPLE), "--json", home=home).stdout)
    # The real cells are read and counted; no claim is made about how well a synthetic model does on them.
    assert real["n_cells"] == 24 and real["n_failed"] == 0


def test_models_list_promote_and_a_clear_error(trained: tuple[Path, str]) -> None:
    home, ref = trained
    assert "cli@production" in allscore("models", "promote", ref, "production", home=home).stdout
    listing = allscore("models", "list", home=home).stdout
    assert ref in listing and "production" in listing
    bad = allscore("models", "show", "cli:nope", home=home, check=False)
    assert bad.returncode == 3  # refused (README, "Exit codes")
    assert "no model manifest" in bad.stderr and "Traceback" not in bad.stderr
