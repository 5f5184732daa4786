"""The project's benchmark scores agree with lm-evaluation-harness's, number for number: the same small model
(exported to transformers) scored at k=0 on the first items of every benchmark by both tools, through the command
a user runs (`python -m evals.commands.agreement`)."""

from __future__ import annotations

import json
import sys

import pytest

from evals.benchmarks import BENCHMARKS
from tests.helpers import run_module

ITEMS = 8
MMLU_SAMPLE = ("mmlu_abstract_algebra", "mmlu_world_religions")
SAMPLED_TASKS = [*(name for name in BENCHMARKS if name != "mmlu"), *MMLU_SAMPLE]
TOLERANCE = 1e-3  # per choice's log-likelihood, fp32


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    """The command's JSON for the sampled tasks, by task name."""
    folder = tmp_path_factory.mktemp("agreement")
    result = run_module("evals.commands.agreement", "--tasks", ",".join(SAMPLED_TASKS), "--items", str(ITEMS),
                        "--json", str(folder / "agreement.json"), cwd=folder, timeout=300)
    sys.stdout.write(result.stdout)  # the table, shown when a test fails
    figures = json.loads((folder / "agreement.json").read_text())
    return result.returncode, {row["task"]: row for row in figures["tasks"]}


@pytest.mark.parametrize("name", SAMPLED_TASKS)
def test_every_benchmark_gets_lm_evaluation_harness_accuracies_and_log_likelihoods(agreement, name):
    _, rows = agreement
    row = rows[name]
    assert row["items"] == ITEMS
    assert row["acc"] == pytest.approx(row["acc_lm_eval"], abs=1e-12)
    if row["acc_norm_lm_eval"] is not None:
        assert row["acc_norm"] == pytest.approx(row["acc_norm_lm_eval"], abs=1e-12)
    assert row["max_log_likelihood_difference"] <= TOLERANCE
    assert row["differing_items"] == 0 and row["agrees"]


def test_the_agreement_command_succeeds_only_when_every_task_agrees(agreement):
    returncode, rows = agreement
    assert sorted(rows) == sorted(SAMPLED_TASKS)  # no MMLU group row: only two subjects were scored
    assert returncode == 0
    assert {name for name, row in rows.items() if row["acc_norm_lm_eval"] is not None} == {
        "hellaswag", "arc_easy", "arc_challenge", "piqa", "openbookqa", "sciq"}  # lm-eval's acc_norm tasks
