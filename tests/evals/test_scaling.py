"""Scaling-law fits: a law with known constants, sampled with noise, is recovered within its intervals, by the
parametric fit and by isoFLOP profiles; the plots and the W&B summary run are what a user opens."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pytest

from evals.scaling.isoflop import BUDGET_RULE, ISOFLOP_MIN_SIZES, compute_budgets, isoflop_profiles
from evals.scaling.law import Law, bootstrap, constant_intervals, fit_law
from evals.scaling.loss_report import analyse
from evals.scaling.plots import plot
from evals.scaling.points import RunPoint, ScalingError, read_csv
from tests.helpers import run_module, wandb_records

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
    for name, true_value in asdict(CHINCHILLA).items():
        low, high = getattr(intervals, name)
        fitted = getattr(law, name)
        assert low <= true_value <= high, f"{name}: true {true_value} outside [{low}, {high}] (fit {fitted})"
    assert law.alpha == pytest.approx(CHINCHILLA.alpha, rel=0.05)
    assert law.beta == pytest.approx(CHINCHILLA.beta, rel=0.05)


def test_the_compute_optimal_split_spends_the_budget_and_minimises_the_loss():
    flops = 5.76e23  # Chinchilla's budget
    parameters, tokens = CHINCHILLA.compute_optimal(flops)
    # The split of the same budget (D = C / 6N) with the lowest loss, found by trying sizes 1e-5 of a decade apart.
    sizes = np.geomspace(1e8, 1e13, 500_001)
    best = sizes[np.argmin(CHINCHILLA.loss(sizes, flops / (6 * sizes)))]
    assert parameters == pytest.approx(best, rel=1e-4)
    assert tokens == pytest.approx(flops / (6 * best), rel=1e-4)


@pytest.mark.parametrize(
    ("parameters", "tokens", "losses", "named"),
    [
        ([1e6] * 6, [1e8, 2e8, 3e8, 4e8, 5e8, 6e8], [3.0] * 6, None),  # one size
        ([1e6, 2e6], [1e8, 2e8], [3.0, 2.9], r"^2 runs\b"),  # how many runs there are
        ([1e6, 2e6, 3e6, 4e6, 5e6], [1e8] * 4 + [2e8], [3.0, 2.9, float("nan"), 2.7, 2.6], None),
        ([1e6, 2e6, 3e6], [1e8, 2e8], [3.0, 2.9, 2.8], None),  # lists of different lengths
    ],
)
def test_runs_a_law_cannot_be_fitted_to_are_refused_saying_why(parameters, tokens, losses, named):
    with pytest.raises(ScalingError, match=named):
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
        assert (tmp_path / "fit" / name).stat().st_size > 1000


def test_a_csv_without_the_needed_columns_or_numbers_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("parameters,tokens\n1e6,1e9\n")
    result = run_module("evals", "scaling", "--csv", str(bad), "--out", str(tmp_path / "fit"), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {bad}: ") and "loss" in result.stderr  # the file, the missing column
    assert not (tmp_path / "fit").exists()
    bad.write_text("parameters,tokens,loss\n1e6,1e9,2.5\n2e6,lots,2.4\n")
    result = run_module("evals", "scaling", "--csv", str(bad), "--out", str(tmp_path / "fit"), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {bad}:3: ") and "lots" in result.stderr  # the file, line and value
    assert not (tmp_path / "fit").exists()


def test_a_csv_that_is_not_utf8_or_not_csv_is_named(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("name,parameters,tokens,loss\nGr\u00f6\u00dfe,1e6,1e9,2.5\n".encode("latin-1"))
    with pytest.raises(ScalingError, match=f"^{re.escape(str(latin1))}: "):
        read_csv(latin1)
    unclosed = tmp_path / "unclosed.csv"  # an unclosed quote swallows the rest of the file into one field
    unclosed.write_text('parameters,tokens,loss\n"1e6,1e9,2.5\n' + "1e6,1e9,2.5\n" * 20_000)
    with pytest.raises(ScalingError, match=f"^{re.escape(str(unclosed))}: "):
        read_csv(unclosed)


AROUND_THE_OPTIMUM = np.geomspace(1 / 8, 8, 7)


def isoflop_sweep(law: Law, budgets, factors=AROUND_THE_OPTIMUM, noise: float = 0.003,
                  seed: int = 0) -> list[RunPoint]:
    """At each compute budget C, the sizes `factors` times the law's N_opt (by default 7 sizes, from 8 times smaller
    to 8 times larger), each trained on D = C / (6 N) tokens give or take 3% (rounded step counts), the loss with
    relative noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for flops in budgets:
        best, _ = law.compute_optimal(flops)
        for parameters in best * np.asarray(factors):
            tokens = flops / (6 * parameters) * rng.uniform(0.97, 1.03)
            loss = float(law.loss(parameters, tokens) * np.exp(rng.normal(0, noise)))
            runs.append(RunPoint(f"c{flops:.0e}-n{parameters:.3g}", float(parameters), float(tokens), loss))
    return runs


def test_isoflop_profiles_recover_the_compute_optimal_exponent_of_a_known_law():
    budgets = np.geomspace(1e18, 1e21, 4)
    profiles = isoflop_profiles(isoflop_sweep(CHINCHILLA, budgets), samples=200)
    assert [len(budget.runs) for budget in profiles.budgets] == [7, 7, 7, 7]  # despite the 3% spread
    true_exponent = CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta)  # Hoffmann et al.'s a = 0.45
    power_law = profiles.power_law
    assert power_law.parameters_exponent == pytest.approx(true_exponent, rel=0.03)
    low, high = power_law.parameters_exponent_interval_95
    assert low <= true_exponent <= high
    # D_opt = C / 6 N_opt grows as C to the power alpha / (alpha + beta).
    assert power_law.tokens_exponent == pytest.approx(CHINCHILLA.alpha / (CHINCHILLA.alpha + CHINCHILLA.beta),
                                                      rel=0.03)
    assert power_law.bootstrap_samples > 150  # resamplings that lost a budget's minimum are left out
    for budget in profiles.budgets:
        true_parameters, true_tokens = CHINCHILLA.compute_optimal(budget.flops)
        assert budget.optimum.optimal_parameters == pytest.approx(true_parameters, rel=0.1)
        assert budget.optimum.optimal_tokens == pytest.approx(true_tokens, rel=0.1)
    low, high = power_law.split_at(5.76e23).parameters_interval_95
    assert low <= CHINCHILLA.compute_optimal(5.76e23)[0] <= high


def test_runs_within_a_factor_1_25_of_a_budgets_cheapest_run_are_one_budget_of_6nd():
    runs = [RunPoint(f"r{flops}", flops / 6e9, 1e9, 3.0) for flops in (126, 100, 124, 110, 200)]
    # The model's own count (attention and the output head) is a larger share of a small model's FLOPs: budgets
    # are set in 6 N D, and grouped by it.
    runs[1] = RunPoint("r100", 100 / 6e9, 1e9, 3.0, flops_per_token=2 * 100 / 1e9)
    assert [[run.name for run in budget] for budget in compute_budgets(runs)] == [
        ["r100", "r110", "r124"], ["r126"], ["r200"]]


def test_budgets_without_a_minimum_among_their_sizes_are_skipped_saying_why():
    def budget(flops, losses):
        return [RunPoint(f"c{flops:.0e}-{i}", parameters, flops / (6 * parameters), loss)
                for i, (parameters, loss) in enumerate(zip((1e6, 1e7, 1e8), losses))]

    runs = budget(1e16, (3.0, 2.5, 2.9)) + budget(1e18, (3.0, 3.2, 2.9)) + budget(1e20, (3.0, 2.8, 2.7))
    profiles = isoflop_profiles(runs, samples=20)
    minimum, downwards, outside = profiles.budgets
    assert minimum.skipped is None and 1e6 < minimum.optimum.optimal_parameters < 1e8
    assert downwards.optimum is None and downwards.skipped
    # It names the sizes trained and which way to go: its loss still falls at the largest.
    assert outside.optimum is None and "1e+06" in outside.skipped and "1e+08" in outside.skipped
    assert "larger" in outside.skipped
    # The budgets with a minimum, and how many the power law needs.
    assert re.findall(r"\d+", profiles.skipped) == ["1", "2"]
    assert profiles.power_law is None
    assert "parameters_exponent" not in profiles.to_json()


def test_a_ladder_without_isoflop_budgets_is_fitted_and_says_why_isoflop_was_skipped(tmp_path):
    # Tokens in proportion to parameters (20, 40, 80 per parameter): no two sizes share a compute budget.
    runs = [RunPoint(f"n{n:.0e}-tpp{m}", n, n * m, float(CHINCHILLA.loss(n, n * m)))
            for n in (1e7, 1e8, 1e9) for m in (20, 40, 80)]
    report = analyse(runs, target_flops=1e21, samples=10, holdout=0)
    assert report.compute_optimal.isoflop is None
    result = report.to_json()
    assert result["law"] and "isoflop" not in result["compute_optimal"]
    skipped = result["isoflop"]["skipped"]
    assert result["isoflop"] == {"budget_rule": BUDGET_RULE, "budgets": [], "skipped": skipped}
    assert re.findall(r"\d+", skipped) == [str(ISOFLOP_MIN_SIZES)]  # the sizes a budget needs
    assert list(result["fewshot"]) == ["skipped"] and result["fewshot"]["skipped"]
    assert [path.name for path in plot(report, tmp_path)] == ["fit.png", "frontier.png"]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FEWSHOT_COLUMNS = ("eval/fewshot/word_labels/k=0", "eval/fewshot/word_labels/k=8", "eval/fewshot/arith/k=8",
                   "eval/fewshot/arith/k=16")


@pytest.fixture(scope="module")
def fitted_sweep(tmp_path_factory):
    """`python -m evals scaling` on the CSV of an isoFLOP sweep (4 budgets of 7 sizes, and a budget whose sizes
    are all too small), with few-shot accuracies at k = 0 and 8 for every run and at 16 for a few, logged to an
    offline W&B run in the group `g`."""
    directory = tmp_path_factory.mktemp("sweep")
    runs = isoflop_sweep(CHINCHILLA, np.geomspace(1e18, 1e21, 4))
    runs += isoflop_sweep(CHINCHILLA, [1e22], factors=(1 / 256, 1 / 128, 1 / 64))  # its loss still falls with N
    lines = ["name,parameters,tokens,loss," + ",".join(FEWSHOT_COLUMNS)]
    for index, run in enumerate(runs):
        accuracy = 1 / (1 + np.exp(8 * (run.loss - 2.6)))  # higher where the loss is lower
        cells = [accuracy / 2, accuracy, accuracy ** 2, accuracy if index % 5 == 0 else ""]
        lines.append(f"{run.name},{run.parameters:.8g},{run.tokens:.8g},{run.loss:.6f},"
                     + ",".join(cell if cell == "" else f"{cell:.4f}" for cell in cells))
    csv = directory / "sweep.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = directory / "fit"
    result = run_module("evals", "scaling", "--csv", str(csv), "--bootstrap", "20", "--target-flops", "1e22",
                        "--out", str(out), "--wandb-group", "g", "--wandb-mode", "offline", cwd=directory)
    assert result.returncode == 0, result.stderr
    return csv, out, result


def test_the_command_plots_isoflop_profiles_and_fewshot_accuracy_at_the_largest_k_of_every_run(fitted_sweep):
    _csv, out, _result = fitted_sweep
    for name in ("fit.png", "frontier.png", "isoflop.png", "fewshot.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE, name
    report = json.loads((out / "scaling.json").read_text())
    assert report["fewshot"] == {"k": 8, "tasks": ["arith", "word_labels"], "runs": 31}  # 16: not in every run
    isoflop = report["isoflop"]
    assert [len(budget["runs"]) for budget in isoflop["budgets"]] == [7, 7, 7, 7, 3]
    # The budget of sizes all too small: skipped, naming the sizes trained and which way to go.
    too_small = isoflop["budgets"][-1]
    assert "optimal_parameters" not in too_small
    assert f"{min(too_small['parameters']):.3g}" in too_small["skipped"]
    assert f"{max(too_small['parameters']):.3g}" in too_small["skipped"] and "larger" in too_small["skipped"]
    assert isoflop["parameters_exponent"] == pytest.approx(0.4516, rel=0.05)
    best = report["compute_optimal"]["isoflop"]
    assert set(best) == {"parameters", "tokens", "parameters_interval_95", "tokens_interval_95"}
    true_parameters, true_tokens = CHINCHILLA.compute_optimal(1e22)
    assert best["parameters"] == pytest.approx(true_parameters, rel=0.1)
    assert best["tokens"] == pytest.approx(true_tokens, rel=0.1)


def test_the_fit_goes_to_a_wandb_run_in_the_sweeps_group_with_its_constants_and_plots(fitted_sweep):
    _csv, out, _result = fitted_sweep
    (offline_run,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(offline_run)
    (run,) = [record["run"] for record in records if record["type"] == "run"]
    assert (run["run_group"], run["job_type"], run["display_name"]) == ("g", "scaling-fit", "g-scaling")
    assert run["config"]["update"]["bootstrap"] == 20 and run["config"]["update"]["target_flops"] == 1e22
    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"]["update"])
    report = json.loads((out / "scaling.json").read_text())
    for name, value in report["law"].items():
        assert summary[f"law/{name}"] == value
        assert [summary[f"law/{name}_low"], summary[f"law/{name}_high"]] == report["intervals_95"][name]
    assert summary["isoflop/parameters_exponent"] == report["isoflop"]["parameters_exponent"]
    assert summary["compute_optimal/isoflop_parameters"] == report["compute_optimal"]["isoflop"]["parameters"]
    assert summary["fewshot/k"] == 8
    for name in ("fit", "frontier", "isoflop", "fewshot"):
        assert summary[f"plots/{name}._type"] == "image-file"
        assert (offline_run / "files" / summary[f"plots/{name}.path"]).read_bytes()[:8] == PNG_SIGNATURE
    assert summary["tables/runs.nrows"] == len(report["runs"])


def test_a_fewshot_k_that_no_run_has_is_refused_naming_those_there_are(fitted_sweep, tmp_path):
    csv, _out, _result = fitted_sweep
    result = run_module("evals", "scaling", "--csv", str(csv), "--fewshot-k", "4", "--out", str(tmp_path / "fit"),
                        cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    # The option, and the k there are.
    assert "--fewshot-k" in result.stderr and "0, 8, 16" in result.stderr
    assert not (tmp_path / "fit").exists()
