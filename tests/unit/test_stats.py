"""Per-sample statistics: the fraction, the Wilson interval, the Rogan-Gladen correction."""

from __future__ import annotations

import math

import pytest

from core.stats import Z_95, fraction, rogan_gladen, wilson_interval
from tests.harness.oracles import wilson_by_inverting_the_score_test


def test_z_95_is_the_normal_quantile() -> None:
    from scipy.stats import norm

    assert norm.ppf(0.975) == pytest.approx(Z_95, abs=1e-15)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (3, 10), (50, 100), (1, 1000), (999, 1000), (7, 13)])
@pytest.mark.parametrize("z", [1.0, Z_95, 2.5758])
def test_wilson_is_the_set_the_score_test_does_not_reject(k: int, n: int, z: float) -> None:
    low, high = wilson_interval(k, n, z)
    expected_low, expected_high = wilson_by_inverting_the_score_test(k, n, z)
    assert low == pytest.approx(expected_low, abs=1e-9)
    assert high == pytest.approx(expected_high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998), Stat Med 17:857, Table I, method 3 (Wilson score, no continuity correction).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    got_low, got_high = wilson_interval(k, n)
    assert got_low == pytest.approx(low, abs=5e-5)
    assert got_high == pytest.approx(high, abs=5e-5)


def test_wilson_bounds_are_exact_at_the_extremes() -> None:
    assert wilson_interval(0, 37)[0] == 0.0
    assert wilson_interval(37, 37)[1] == 1.0


def test_wilson_is_symmetric_in_the_labels() -> None:
    low, high = wilson_interval(12, 40)
    flipped_low, flipped_high = wilson_interval(28, 40)
    assert low == pytest.approx(1 - flipped_high, abs=1e-12)
    assert high == pytest.approx(1 - flipped_low, abs=1e-12)


def test_wilson_narrows_with_more_cells() -> None:
    widths = [wilson_interval(n // 4, n)[1] - wilson_interval(n // 4, n)[0] for n in (8, 80, 800)]
    assert widths[0] > widths[1] > widths[2]


def test_wilson_with_no_cells_is_the_whole_unit_interval() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (1, -5), (6, 5)])
def test_impossible_counts_are_refused(k: int, n: int) -> None:
    with pytest.raises(ValueError, match=r"k=|n="):
        wilson_interval(k, n)
    with pytest.raises(ValueError):
        fraction(k, n)


@pytest.mark.parametrize("z", [0.0, -1.96, math.nan, math.inf])
def test_wilson_refuses_a_meaningless_z(z: float) -> None:
    with pytest.raises(ValueError, match="z must be"):
        wilson_interval(1, 2, z)


def test_the_fraction_is_positives_over_cells_and_none_without_cells() -> None:
    assert fraction(3, 12) == 0.25
    assert fraction(0, 5) == 0.0
    assert fraction(7, 7) == 1.0
    assert fraction(0, 0) is None


def apparent_prevalence(true_prevalence: float, sensitivity: float, specificity: float) -> float:
    """What a classifier calls positive in a population: its true positives plus its false positives."""
    return true_prevalence * sensitivity + (1 - true_prevalence) * (1 - specificity)


@pytest.mark.parametrize("true_prevalence", [0.0, 0.02, 0.3, 0.5, 0.97, 1.0])
@pytest.mark.parametrize(("sens", "spec"), [(0.9, 0.8), (0.95, 0.7), (0.6, 0.6), (1.0, 1.0), (0.55, 0.99)])
def test_rogan_gladen_recovers_the_true_prevalence_from_what_the_classifier_calls(
    true_prevalence: float, sens: float, spec: float
) -> None:
    called = apparent_prevalence(true_prevalence, sens, spec)
    assert rogan_gladen(called, sens, spec) == pytest.approx(true_prevalence, abs=1e-12)


@pytest.mark.parametrize(
    ("p", "sens", "spec", "expected"),
    # Worked by hand: (p + spec - 1) / (sens + spec - 1) = 0.1 / 0.7, 0.2 / 0.65, 0.15 / 0.7.
    [(0.3, 0.9, 0.8, 0.142857142857), (0.5, 0.95, 0.7, 0.307692307692), (0.25, 0.8, 0.9, 0.214285714286)],
)
def test_rogan_gladen_worked_examples(p: float, sens: float, spec: float, expected: float) -> None:
    assert rogan_gladen(p, sens, spec) == pytest.approx(expected, abs=1e-11)


def test_rogan_gladen_clips_to_the_unit_interval() -> None:
    # Fewer calls than the false-positive rate alone (1 - 0.8 = 0.2) would give: no prevalence explains it.
    assert rogan_gladen(0.1, 0.9, 0.8) == 0.0
    assert rogan_gladen(0.2, 0.9, 0.8) == pytest.approx(0.0, abs=1e-12)
    # More calls than a prevalence of 1 would give (0.9, the sensitivity).
    assert rogan_gladen(1.0, 0.9, 0.8) == 1.0
    assert rogan_gladen(0.95, 0.9, 0.8) == 1.0


@pytest.mark.parametrize(("sens", "spec"), [(0.5, 0.5), (0.3, 0.6), (0.0, 0.0)])
def test_rogan_gladen_is_undefined_for_a_chance_level_classifier(sens: float, spec: float) -> None:
    assert rogan_gladen(0.4, sens, spec) is None


@pytest.mark.parametrize(("p", "sens", "spec"), [(-0.1, 0.9, 0.9), (0.5, 1.1, 0.9), (0.5, 0.9, math.nan)])
def test_rogan_gladen_refuses_values_that_are_not_proportions(p: float, sens: float, spec: float) -> None:
    with pytest.raises(ValueError, match="must be a proportion"):
        rogan_gladen(p, sens, spec)
