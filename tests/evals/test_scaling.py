"""Scaling-law fits: a law with known constants, sampled with noise, is recovered within its intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals.scaling import Law, ScalingError, bootstrap, constant_intervals, fit_law
from tests.helpers import run_module

# Hoffmann et al. (2022), eq. 10: the Chinchilla fit.
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def noisy_ladder(law: Law, noise: float, seed: int = 0):
    """8 model sizes x 8 token budgets, the loss multiplied by log-normal noise of `noise` (relative)."""
    sizes, budgets = np.geomspace(1e6, 3e9, 8), np.geomspace(1e8, 3e11, 8)
    parameters, tokens = (grid.ravel() for grid in np.meshgrid(sizes, budgets))
    rng = np.random.default_rng(seed)
    return parameters, tokens, law.loss(parameters, tokens) * np.exp(rng.normal(0, noise, parameters.size))


def test_the_fit_recovers_a_known_law_within_its_bootstrap_intervals():
    parameters, tokens, losses = noisy_ladder(CHINCHILLA, noise=0.005)
    law = fit_law(parameters, tokens, losses)
    intervals = constant_intervals(bootstrap(parameters, tokens, losses, law, samples=100))
    for name, true_value in CHINCHILLA.as_dict().items():
        low, high = intervals[name]
        assert low <= true_value <= high, f"{name}: true {true_value} outside [{low}, {high}] (fit {getattr(law, name)})"
    assert law.alpha == pytest.approx(CHINCHILLA.alpha, rel=0.05)
    assert law.beta == pytest.approx(CHINCHILLA.beta, rel=0.05)


def test_the_compute_optimal_split_spends_the_budget_and_minimises_the_loss():
    flops = 5.76e23  # Chinchilla's budget
    parameters, tokens = CHINCHILLA.compute_optimal(flops)
    assert 6 * parameters * tokens == pytest.approx(flops)
    # Any other split of the same budget predicts a higher loss.
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert CHINCHILLA.loss(parameters * factor, tokens / factor) > CHINCHILLA.loss(parameters, tokens)


@pytest.mark.parametrize(
    ("parameters", "tokens", "losses", "message"),
    [
        ([1e6] * 6, [1e8, 2e8, 3e8, 4e8, 5e8, 6e8], [3.0] * 6, "at least 2 model sizes and 2 token budgets"),
        ([1e6, 2e6], [1e8, 2e8], [3.0, 2.9], "2 runs: a law of 5 constants needs at least 5 runs"),
        ([1e6, 2e6, 3e6, 4e6, 5e6], [1e8] * 4 + [2e8], [3.0, 2.9, float("nan"), 2.7, 2.6], "positive finite"),
        ([1e6, 2e6, 3e6], [1e8, 2e8], [3.0, 2.9, 2.8], "lists of the same length"),
    ],
)
def test_runs_a_law_cannot_be_fitted_to_are_refused_saying_why(parameters, tokens, losses, message):
    with pytest.raises(ScalingError, match=message):
        fit_law(parameters, tokens, losses)


def test_the_command_fits_a_csv_from_elsewhere_with_a_holdout_check_and_the_optimal_split(tmp_path):
    parameters, tokens, losses = noisy_ladder(CHINCHILLA, noise=0.005)
    ladder = tmp_path / "ladder.csv"
    ladder.write_text("name,parameters,tokens,loss\n" + "".join(
        f"run{i},{n:.6g},{d:.6g},{loss:.6f}\n" for i, (n, d, loss) in enumerate(zip(parameters, tokens, losses))))
    result = run_module("evals", "scaling", "--csv", str(ladder), "--holdout", "8", "--target-flops", "5.76e23",
                        "--bootstrap", "50", "--out", str(tmp_path / "fit"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "fit" / "scaling.json").read_text())
    assert report["law"]["alpha"] == pytest.approx(CHINCHILLA.alpha, rel=0.05)
    low, high = report["intervals_95"]["beta"]
    assert low <= CHINCHILLA.beta <= high
    # The 8 largest-compute runs, predicted by a fit that never saw them, within 2% of their loss.
    assert len(report["holdout"]["held_out"]) == 8
    assert max(abs(error) for error in report["holdout"]["relative_errors"]) < 0.02
    optimal = report["compute_optimal"]
    low, high = optimal["parameters_interval_95"]
    assert low <= CHINCHILLA.compute_optimal(5.76e23)[0] <= high
    for name in ("scaling.json", "fit.png", "frontier.png"):
        assert f"wrote {tmp_path / 'fit' / name}" in result.stdout
        assert (tmp_path / "fit" / name).stat().st_size > 1000


def test_a_csv_without_the_needed_columns_or_numbers_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("parameters,tokens\n1e6,1e9\n")
    result = run_module("evals", "scaling", "--csv", str(bad), "--out", str(tmp_path / "fit"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {bad}: needs a header with the columns parameters, tokens, loss"
                                     " (missing: loss) and at least one row")
    bad.write_text("parameters,tokens,loss\n1e6,1e9,2.5\n2e6,lots,2.4\n")
    result = run_module("evals", "scaling", "--csv", str(bad), "--out", str(tmp_path / "fit"), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith(f"error: {bad}:3: parameters, tokens and loss must")
    assert not (tmp_path / "fit").exists()
