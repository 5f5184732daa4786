"""A finished run as points for the scaling fits: from its config, its metrics and the model's own counts,
`scaling_point` gives its point for the loss fit and `task_points` its few-shot evaluations for the task-scaling fit;
`target_of_config` describes a model not trained yet, for the task-scaling prediction."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from evals.fewshot_results import fewshot_metric
from evals.scaling.points import RunPoint, ScalingError
from evals.scaling.task_points import Target, TaskPoint
from pretrain.config import Config, load_config
from pretrain.model import GPT
from pretrain.rundir.reader import CONFIG_FILE, METRICS_FILE, metrics_path, read_metrics, run_config


def non_embedding_parameters(config: Config) -> int:
    """N of the config's model, without embeddings: the count scaling laws use."""
    with torch.device("meta"):  # counts only: no memory for the weights
        return GPT(config.model).num_parameters(include_embeddings=False)


def target_of_config(path: Path, tokens: float | None = None) -> Target:
    """The model a run config (or a run directory's) describes as a task-scaling target: its N without embeddings,
    and `tokens` or else the tokens its schedule trains on (max_steps x global_batch_tokens). Named after the
    config's run name, with D where `tokens` is given."""
    config = run_config(path) if Path(path).is_dir() else load_config(path)
    parameters = non_embedding_parameters(config)
    if tokens is None:
        return Target(config.name, parameters, config.train.max_steps * config.train.global_batch_tokens)
    return Target(f"{config.name},D={tokens:.3g}", parameters, tokens)


def scaling_point(run_dir: Path) -> RunPoint:
    """A finished run's point for the scaling fit: N (without embeddings) and the FLOPs per token from its
    config's model, D and the loss from its last validation, and its few-shot accuracies at that step."""
    config = run_config(run_dir)
    records = read_metrics(run_dir)
    validation = [record for record in records if "val/loss" in record]
    if not validation or validation[-1]["step"] != config.train.max_steps:
        raise ScalingError(f"{run_dir}: has not finished (no validation loss at step {config.train.max_steps});"
                           " finish or remove it before fitting")
    with torch.device("meta"):  # counts only: no memory for the weights
        model = GPT(config.model)
    last = validation[-1]
    fewshot = {key: value for record in records if record["step"] == last["step"]
               for key, value in record.items() if key.startswith("eval/fewshot/")}
    tokens = last["step"] * config.train.global_batch_tokens
    return RunPoint(config.name, model.num_parameters(include_embeddings=False), tokens, last["val/loss"],
                    model.num_parameters(), model.flops_per_token(), fewshot or None)


def task_points(run_dir: Path) -> list[TaskPoint]:
    """A finished run's every few-shot evaluation that has a task loss, as task-scaling points: N without
    embeddings, the tokens seen at that step, and each task and k's accuracy and bits per byte."""
    config = run_config(run_dir)
    records = [record for record in read_metrics(run_dir) if any(fewshot_metric(key) for key in record)]
    if not records:
        raise ScalingError(f"{run_dir}: has no few-shot evaluation in its {METRICS_FILE}; evaluate in the loop"
                           " (eval.fewshot.interval) before fitting task scaling")
    if records[-1]["step"] != config.train.max_steps:
        raise ScalingError(f"{run_dir}: has not finished (no few-shot evaluation at step {config.train.max_steps});"
                           " finish or remove it before fitting")
    parameters = non_embedding_parameters(config)
    points = []
    for record in records:
        for key, accuracy in record.items():
            if (found := fewshot_metric(key)) and f"{key}/bits_per_byte" in record:
                task_loss = record[f"{key}/bits_per_byte"]
                if not (math.isfinite(task_loss) and task_loss > 0 and 0 <= accuracy <= 1):
                    raise ScalingError(f"{metrics_path(run_dir)}: step {record['step']}: {key} is {accuracy} with a"
                                       f" task loss of {task_loss}, not an accuracy and a positive number; evaluate"
                                       " that checkpoint again, or leave the run out")
                # The tokens seen, where logged: exact across a change of batch size (continue_by_tokens).
                tokens = record.get("train/tokens", record["step"] * config.train.global_batch_tokens)
                points.append(TaskPoint(run=config.name, parameters=parameters, tokens=tokens, task=found[0],
                                        shots=found[1], task_loss=task_loss, accuracy=accuracy))
    if not points:
        raise ScalingError(f"{run_dir}: its few-shot evaluations have no task loss (bits_per_byte), as generation"
                           " tasks do not; evaluate a multiple-choice task")
    return points


def run_directories(paths: list[Path]) -> list[Path]:
    """Run directories, and the run directories in directories that hold them (a sweep's output), in order."""
    found = []
    for path in paths:
        if (path / CONFIG_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(child for child in sorted(path.iterdir()) if (child / CONFIG_FILE).is_file())
        else:
            raise ScalingError(f"{path}: no such run directory")
    if not found:
        raise ScalingError(f"no run directories (with a {CONFIG_FILE}) in {', '.join(map(str, paths))}")
    return list({path.resolve(): path for path in found}.values())  # a run named twice (itself and its sweep) once


def scaling_points(paths: list[Path]) -> list[RunPoint]:
    """The points of run directories, or of directories that hold run directories (a sweep's output)."""
    return [scaling_point(run_dir) for run_dir in run_directories(paths)]


def task_scaling_points(paths: list[Path]) -> list[TaskPoint]:
    """The task-scaling points of run directories, or of directories that hold them."""
    points, named = [], {}
    for run_dir in run_directories(paths):
        found = task_points(run_dir)
        if (other := named.setdefault(found[0].run, run_dir)) != run_dir:
            raise ScalingError(f"{other} and {run_dir}: two runs named {found[0].run}; fit one of them, or rename"
                               " one (its config's name)")
        points += found
    return points
