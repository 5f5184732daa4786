"""Task scaling: from a ladder's few-shot evaluations, the task loss as L(N, D) and the accuracy as a sigmoid of
it, chained to predict a larger model's accuracy at each k. Ladders with known constants are recovered; run
directories and their CSV give the same fit; bad input is refused, naming it, with exit code 2."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from evals.__main__ import main as evals_main
from evals.scaling.law import Law
from evals.scaling.points import ScalingError
from evals.scaling.task_law import Sigmoid, final_points, fit_sigmoid, fit_task, last_tokens
from evals.scaling.task_points import Target, TaskPoint, read_task_csv, task_csv_text
from evals.scaling.task_report import analyse_tasks, check_targets, points_by_run, resampled
from pretrain.config import load_config
from pretrain.rundir.points import non_embedding_parameters, task_scaling_points

TRUE_LAW = Law(E=0.6, A=40.0, B=300.0, alpha=0.35, beta=0.32)
TRUE_SIGMOIDS = {0: Sigmoid(a=0.6, s=-6.0, L0=2.6, b=0.25), 8: Sigmoid(a=0.65, s=-5.0, L0=2.8, b=0.25)}
SIZES = (1e5, 2e5, 4e5, 8e5)
MULTIPLES = (20, 40, 80)  # tokens per parameter of each run's final checkpoint
TARGET = Target("big", 3.2e6, 64e6)  # 4x the largest size, on 20 tokens per parameter


def ladder(loss_noise: float = 0.0, accuracy_noise: float = 0.0, sizes=SIZES, seed: int = 0) -> list[TaskPoint]:
    """Each size on each budget, evaluated at a quarter, half, three quarters and all of it, at k = 0 and 8."""
    rng = np.random.default_rng(seed)
    points = []
    for shots, sigmoid in TRUE_SIGMOIDS.items():
        for size in sizes:
            for multiple in MULTIPLES:
                for fraction in (0.25, 0.5, 0.75, 1.0):
                    tokens = multiple * size * fraction
                    loss = float(TRUE_LAW.loss(size, tokens) * np.exp(rng.normal(0, loss_noise)))
                    accuracy = float(np.clip(sigmoid.accuracy(loss) + rng.normal(0, accuracy_noise), 0, 1))
                    points.append(TaskPoint(f"n{size:g}-x{multiple}", size, tokens, "t", shots, loss, accuracy))
    return points


def test_step_one_recovers_the_task_loss_law_from_the_final_checkpoints():
    points = [point for point in ladder() if point.shots == 0]
    # Checkpoints before the last are off the law (as a run's are before its decay): step 1 must not read them.
    finals = final_points(points)
    points = [point if point in finals else replace(point, task_loss=point.task_loss * 1.3) for point in points]
    fit = fit_task(points)
    assert fit.runs == len(SIZES) * len(MULTIPLES) and fit.checkpoints == len(points)
    for name, true_value in asdict(TRUE_LAW).items():
        assert getattr(fit.law, name) == pytest.approx(true_value, rel=0.02), name


def test_step_two_recovers_a_known_sigmoid_from_noisy_accuracies():
    rng = np.random.default_rng(1)
    losses = rng.uniform(1.5, 4.5, 300)
    truth = TRUE_SIGMOIDS[0]
    fitted = fit_sigmoid(losses, truth.accuracy(losses) + rng.normal(0, 0.02, losses.size))
    assert fitted.a == pytest.approx(truth.a, abs=0.03)
    assert fitted.b == pytest.approx(truth.b, abs=0.02)
    assert fitted.L0 == pytest.approx(truth.L0, abs=0.05)
    assert fitted.s == pytest.approx(truth.s, rel=0.2)


def test_the_chain_predicts_a_four_times_larger_model_within_its_interval():
    report = analyse_tasks(ladder(loss_noise=0.003, accuracy_noise=0.01), [TARGET], samples=30)
    assert report.bootstrap_samples >= 25
    assert [(p.target, p.task, p.shots) for p in report.predictions] == [("big", "t", 0), ("big", "t", 8)]
    for prediction in report.predictions:
        true_loss = float(TRUE_LAW.loss(TARGET.parameters, TARGET.tokens))
        true_accuracy = float(TRUE_SIGMOIDS[prediction.shots].accuracy(true_loss))
        assert prediction.task_loss == pytest.approx(true_loss, rel=0.03)
        assert prediction.accuracy == pytest.approx(true_accuracy, abs=0.03)
        low, high = prediction.accuracy_interval
        assert low - 0.01 <= true_accuracy <= high + 0.01 and low <= prediction.accuracy <= high


def test_holding_out_the_largest_size_predicts_its_runs_from_the_others():
    report = analyse_tasks(ladder(), [], samples=0, holdout=True)
    holdout = report.holdout
    assert holdout.parameters == max(SIZES)
    assert holdout.held_out == [f"n{max(SIZES):g}-x{m}" for m in sorted(MULTIPLES, key=str)]
    assert len(holdout.errors) == len(MULTIPLES) * len(TRUE_SIGMOIDS)
    for error in holdout.errors:
        assert error.predicted_task_loss == pytest.approx(error.task_loss, rel=0.01)
        assert error.predicted_accuracy == pytest.approx(error.accuracy, abs=0.01)
    assert report.predictions == [] and report.bootstrap_samples == 0


def test_a_run_drawn_twice_by_the_bootstrap_counts_twice():
    points = ladder()
    runs = sorted({point.run for point in points})
    drawn = resampled(points_by_run(points), np.random.default_rng(3))
    assert len(last_tokens(drawn)) == len(runs)  # as many runs as the ladder has, some of them twice
    assert len({point.run.split("#")[0] for point in drawn}) < len(runs) and len(drawn) == len(points)


def test_two_targets_of_one_name_are_refused():
    with pytest.raises(ScalingError, match="share a name"):
        check_targets([TARGET, replace(TARGET, tokens=2 * TARGET.tokens)], list(SIZES), [1e6, 1e8])


def write_runs(root: Path, base: Path) -> Path:
    """A ladder's run directories as training leaves them (config.yaml and metrics.jsonl; few-shot evaluations at
    half and all of each run), 3 sizes x 2 budgets, their task losses and accuracies from the true constants."""
    sweep = root / "ladder"
    for d_model in (32, 64, 96):
        for steps in (40, 80):
            config = load_config(base, [f"name=l-d{d_model}-s{steps}", f"model.d_model={d_model}",
                                        f"train.max_steps={steps}", f"output_dir={sweep}"])
            config.run_dir.mkdir(parents=True)
            (config.run_dir / "config.yaml").write_text(config.to_yaml())
            parameters = non_embedding_parameters(config)
            records = []
            for step in (steps // 2, steps):
                record = {"step": step}
                for shots, sigmoid in TRUE_SIGMOIDS.items():
                    loss = float(TRUE_LAW.loss(parameters * 10, step * config.train.global_batch_tokens * 100))
                    name = f"eval/fewshot/t/k={shots}"
                    record |= {name: float(sigmoid.accuracy(loss)), f"{name}/bits_per_byte": loss,
                               f"{name}/acc_norm": 0.5}
                records.append(record)
            (config.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return sweep


def test_run_directories_and_their_csv_give_the_same_fit(tiny_config, tmp_path, in_process):
    sweep = write_runs(tmp_path, tiny_config())
    from_runs = in_process(evals_main, "task-scaling", "--runs", str(sweep), "--target-parameters", "4e5",
                           "--target-tokens", "1e6", "--bootstrap", "5", "--out", str(tmp_path / "a"))
    assert from_runs.returncode == 0, from_runs.stderr
    points = task_scaling_points([sweep])
    assert len(points) == 6 * 2 * 2 and read_task_csv(tmp_path / "a" / "task_points.csv") == points
    config = load_config(sweep / "l-d64-s80" / "config.yaml")
    final = [p for p in points if p.run == "l-d64-s80" and p.tokens == 80 * config.train.global_batch_tokens]
    assert {p.parameters for p in final} == {non_embedding_parameters(config)} and len(final) == 2

    # The CSV as a user might assemble it: its own column order and row order, and a column of its own.
    by_hand = tmp_path / "by_hand.csv"
    by_hand.write_text("accuracy,task_loss,shots,task,tokens,parameters,run,notes\n" + "".join(
        f"{p.accuracy!r},{p.task_loss!r},{p.shots},{p.task},{p.tokens!r},{p.parameters!r},{p.run},x\n"
        for p in reversed(points)))
    from_csv = in_process(evals_main, "task-scaling", "--csv", str(by_hand), "--target-parameters", "4e5",
                          "--target-tokens", "1e6", "--bootstrap", "5", "--out", str(tmp_path / "b"))
    assert from_csv.returncode == 0, from_csv.stderr
    written = json.loads((tmp_path / "a" / "task_scaling.json").read_text())
    again = json.loads((tmp_path / "b" / "task_scaling.json").read_text())
    assert [(p["task"], p["shots"]) for p in written["predictions"]] == [("t", 0), ("t", 8)]
    for ours, theirs in zip(written["predictions"], again["predictions"], strict=True):
        assert {"task", "shots", "task_loss", "accuracy", "accuracy_interval"} <= ours.keys()
        for key in ("task_loss", "accuracy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
    for ours, theirs in zip(written["fits"], again["fits"], strict=True):
        assert ours["task_loss_law"] == pytest.approx(theirs["task_loss_law"], rel=1e-4)
        assert ours["accuracy_sigmoid"] == pytest.approx(theirs["accuracy_sigmoid"], rel=1e-4, abs=1e-6)
    for name in ("task_loss.png", "accuracy.png", "curve.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_target_read_from_a_config_is_its_model_on_its_schedules_tokens(tiny_config, tmp_path, in_process):
    sweep = write_runs(tmp_path, tiny_config())
    base = tiny_config({"name": "bigger", "model": {"d_model": 192}, "train": {"max_steps": 200}}, "bigger.yaml")
    result = in_process(evals_main, "task-scaling", "--runs", str(sweep), "--target-config", str(base),
                        "--bootstrap", "3", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    (target,) = json.loads((tmp_path / "out" / "task_scaling.json").read_text())["targets"]
    config = load_config(base)
    assert target == {"name": "bigger", "parameters": non_embedding_parameters(config),
                      "tokens": 200 * config.train.global_batch_tokens}


def csv_with(tmp_path: Path, points: list[TaskPoint], change=None) -> Path:
    text = task_csv_text(points)
    path = tmp_path / "ladder.csv"
    path.write_text(change(text) if change else text)
    return path


BAD_INPUTS = {
    "a column missing": (lambda text: text.replace(",accuracy\n", "\n", 1), [], "accuracy"),
    "a cell not a number": (lambda text: text.replace("n100000-x20,100000.0,500000.0,", "n100000-x20,100000.0,lots,",
                                                      1), [], "ladder.csv:2: tokens"),
    "one model size": (None, ["sizes"], "1 model size"),
    "one ratio of tokens to parameters": (None, ["ratio"], "one ratio of tokens to parameters"),
    "one run name for two sizes": (lambda text: text.replace("n200000-x20,", "n100000-x20,"), [],
                                   "run n100000-x20"),
    "one token budget": (None, ["budget"], "1 token budget"),
    "a task loss that does not vary": (None, ["constant"], "does not vary"),
    "a target far outside the ladder": (None, ["--target-parameters", "1e15", "--target-tokens", "1e8"],
                                        "N = 1e+15"),
    "a target without its tokens": (None, ["--target-parameters", "1e6"], "--target-tokens"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_refused_naming_it_and_nothing_is_written(case, tmp_path, in_process):
    change, options, named = BAD_INPUTS[case]
    points = ladder()
    if "sizes" in options:
        points = ladder(sizes=(1e5,))
    if "budget" in options:  # every run trained on the same tokens, whatever its size
        points = [replace(point, tokens=point.tokens / point.parameters * 1e6) for point in ladder()
                  if point.run.endswith("-x20")]
    if "ratio" in options:
        points = [point for point in ladder() if point.run.endswith("-x20")]
    if "constant" in options:
        points = [replace(point, task_loss=2.0) for point in points]
    options = [option for option in options if option not in ("sizes", "budget", "ratio", "constant")]
    csv = csv_with(tmp_path, points, change)
    out = tmp_path / "out"
    result = in_process(evals_main, "task-scaling", "--csv", str(csv), *options, "--bootstrap", "2", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
