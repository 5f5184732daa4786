"""Reading a run directory (output_dir/name): the one way every command reads what a run left behind.

A run directory holds its resolved `config.yaml`, its `metrics.jsonl` (one JSON record per line, each with a
whole-number `step`), its checkpoints, and points to its data directory, where its tokenizer is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from data_pipeline.common.errors import DataError, UserError
from data_pipeline.tokenizer import load_tokenizer
from pretrain import checkpoint_store
from pretrain.config import Config, load_config
from pretrain.distributed import DistributedContext, init_distributed, shutdown
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

    @property
    def tag(self) -> str:
        """The checkpoint's folder name (step_00001000), which what is written from it is filed under."""
        return checkpoint_store.tag_for_step(self.step)


def load_checkpoint(run_dir: Path, step: int | None = None) -> TrainedModel:
    """The run's model at its newest complete checkpoint (or at `step`), whatever ZeRO stage and ranks wrote it."""
    config = run_config(run_dir)
    source = find_checkpoint(run_dir, step)
    model = GPT(config.model)
    model.load_state_dict(checkpoint_store.consolidated_state_dict(source))
    return TrainedModel(model=model.eval(), step=checkpoint_store.read_marker(source)["step"], config=config)


@contextlib.contextmanager
def ranks_of_this_job(config: Config) -> Iterator[DistributedContext | None]:
    """The process group of a command that torchrun started on several ranks (WORLD_SIZE above 1), each rank
    evaluating its share of a run's model, set up as training sets it up; None for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    context = init_distributed(config.deepspeed)
    try:
        yield context
    finally:
        shutdown()
