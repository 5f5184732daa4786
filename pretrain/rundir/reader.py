"""Reading a run directory (output_dir/name): the one way every command reads what a run left behind.

A run directory holds its resolved `config.yaml`, its `metrics.jsonl` (one JSON record per line, each with a
whole-number `step`), its checkpoints, and points to its data directory, where its tokenizer is. From these
files and the model's own counts, `scaling_point` gives a finished run's point for the scaling fit, and
`task_points` its few-shot evaluations for the task-scaling fit.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from data_pipeline.common.errors import DataError, UserError
from data_pipeline.tokenizer import load_tokenizer
from evals.fewshot_results import fewshot_metric
from evals.scaling.points import RunPoint, ScalingError
from evals.scaling.task_points import Target, TaskPoint
from pretrain import checkpoint_store
from pretrain.config import Config, load_config
from pretrain.model import GPT

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class RunDirectoryError(UserError):
    """A run directory, or one of its files, that cannot be read; the message names it and what to do."""


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics records in the order they were written ([] before its first step). A last line cut short
    as it was written (no newline: the process or machine died mid-write) is dropped with a warning; any other
    line that is not a record with a whole-number step is a RunDirectoryError naming the file and line."""
    path = metrics_path(run_dir)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if number == len(lines) and not text.endswith("\n"):
                print(f"warning: {path}:{number}: the last line was cut short as it was written; dropped",
                      file=sys.stderr)
                break
            raise RunDirectoryError(f"{path}:{number}: not a metrics record ({error}); was the file edited?") from None
        if not isinstance(step, int):
            raise RunDirectoryError(f"{path}:{number}: step {step!r} is not a whole number; was the file edited?")
        records.append(record)
    return records


def run_config(run_dir: Path) -> Config:
    """The resolved config a run saved; RunDirectoryError if the directory is not a run."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir}: is not a run directory (it has no {CONFIG_FILE})")
    return load_config(path)


# What a finished run may differ in from a config that asks for it again and still be the same run: how it is
# watched, evaluated, checkpointed and launched, and where and how its data is read.
FREE_SETTINGS = ("logging", "launch", "eval", "train.checkpoint_every", "train.checkpoint_steps",
                 "train.keep_checkpoints", "train.resume", "train.data_order_change", "data.shard_url",
                 "data.fetch_timeout_seconds", "data.fetch_deadline_seconds", "data.fetch_retries", "data.shard_cache",
                 "data.shard_cache_bytes", "data.loader_workers", "data.verify")


def dotted_settings(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dump as {"train.lr": 0.003, ...}."""
    flat = {}
    for key, value in section.items():
        if isinstance(value, dict) and value:
            flat.update(dotted_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finished_with(config: Config) -> list[str] | None:
    """None if the run has no complete checkpoint at `config.train.max_steps`; else, as `setting: saved -> now`,
    each setting in which `config` differs from the config the run saved, less FREE_SETTINGS ([]: the same run)."""
    newest = checkpoint_store.newest_complete(config.run_dir)
    if newest is None or checkpoint_store.read_marker(newest)["step"] != config.train.max_steps:
        return None
    saved = dotted_settings(run_config(config.run_dir).model_dump(mode="json"))
    now = dotted_settings(config.model_dump(mode="json"))
    changed = [key for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)]
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in changed
            if not any(key == free or key.startswith(f"{free}.") for free in FREE_SETTINGS)]


def run_tokenizer(config: Config) -> Tokenizer:
    """The tokenizer the run trained with, from its data directory; DataError if it is not there."""
    path = Path(config.data.dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(
            f"{path}: the run's tokenizer is missing; run from the directory training ran in, or prepare the data"
            " again with `make data`"
        )
    return load_tokenizer(path, config.model.vocab_size)


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The newest complete checkpoint of the run, or the one at `step`; CheckpointError if there is none."""
    newest = checkpoint_store.newest_complete(run_dir)
    if newest is None:
        raise checkpoint_store.CheckpointError(f"{run_dir}: has no complete checkpoint; train it first")
    if step is None:
        return newest
    tags = checkpoint_store.complete_tags(run_dir)
    tag = checkpoint_store.tag_for_step(step)
    if tag not in tags:
        steps = ", ".join(str(int(t.removeprefix("step_"))) for t in tags)
        raise checkpoint_store.CheckpointError(f"{run_dir}: has no complete checkpoint at step {step}; it has: {steps}")
    return checkpoint_store.checkpoints_dir(run_dir) / tag


@dataclass(frozen=True)
class TrainedModel:
    model: GPT  # whole fp32 weights on the CPU, in eval mode
    step: int  # the step the checkpoint was written at
    config: Config  # the run's


def load_checkpoint(run_dir: Path, step: int | None = None) -> TrainedModel:
    """The run's model at its newest complete checkpoint (or at `step`), whatever ZeRO stage and ranks wrote it."""
    config = run_config(run_dir)
    source = find_checkpoint(run_dir, step)
    model = GPT(config.model)
    model.load_state_dict(checkpoint_store.consolidated_state_dict(source))
    return TrainedModel(model.eval(), checkpoint_store.read_marker(source)["step"], config)


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
