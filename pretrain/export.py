"""Export a checkpoint as one file of whole fp32 weights, for evaluation and other tools:

    python -m pretrain.export runs/quickstart [--step N] [--out PATH]

Whatever ZeRO stage and number of ranks wrote the checkpoint, the file holds {"model": the run's model config,
"state_dict": fp32 weights by parameter name, "step": N}. `load_exported` turns it back into a GPT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data_pipeline.cli import run_command
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import load_tokenizer
from pretrain import checkpoint
from pretrain.config import Config, ModelConfig, load_config
from pretrain.model import GPT


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The newest complete checkpoint of the run, or the one at `step`; CheckpointError if there is none."""
    newest = checkpoint.newest_complete(run_dir)
    if newest is None:
        raise checkpoint.CheckpointError(f"{run_dir}: has no complete checkpoint; train it first")
    if step is None:
        return newest
    tags = checkpoint.complete_tags(run_dir)
    tag = checkpoint.tag_for_step(step)
    if tag not in tags:
        steps = ", ".join(str(int(t.removeprefix("step_"))) for t in tags)
        raise checkpoint.CheckpointError(f"{run_dir}: has no complete checkpoint at step {step}; it has: {steps}")
    return checkpoint.checkpoints_dir(run_dir) / tag


def run_config(run_dir: Path) -> Config:
    """The resolved config a run saved; CheckpointError if the directory is not a run."""
    if not (run_dir / "config.yaml").is_file():
        raise checkpoint.CheckpointError(f"{run_dir}: is not a run directory (it has no config.yaml)")
    return load_config(run_dir / "config.yaml")


def run_tokenizer(config: Config) -> Tokenizer:
    """The tokenizer the run trained with, from its data directory; DataError if it is not there."""
    path = Path(config.data.dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(
            f"{path}: the run's tokenizer is missing; run from the directory training ran in, or prepare the data"
            " again with `make data`"
        )
    return load_tokenizer(path, config.model.vocab_size)


def load_checkpoint(run_dir: Path, step: int | None = None) -> tuple[GPT, int, Config]:
    """The run's model at its newest complete checkpoint (or at `step`), whole fp32 weights on the CPU in eval
    mode, with the step it was trained to and the run's config."""
    config = run_config(run_dir)
    source = find_checkpoint(run_dir, step)
    model = GPT(config.model)
    model.load_state_dict(checkpoint.consolidated_state_dict(source))
    return model.eval(), checkpoint.read_marker(source)["step"], config


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    model, written_at, config = load_checkpoint(run_dir, step)
    out = out or run_dir / "export" / f"{checkpoint.tag_for_step(written_at)}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    exported = {
        "model": config.model.model_dump(mode="json"),
        "state_dict": model.state_dict(),
        "step": written_at,
    }
    partial = out.with_name(out.name + ".partial")  # an interrupted export never replaces a good file
    torch.save(exported, partial)
    partial.rename(out)
    return out


def load_exported(path: Path) -> tuple[GPT, int]:
    """The exported model (on the CPU, in eval mode) and the step it was trained to."""
    exported = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(ModelConfig.model_validate(exported["model"]))
    model.load_state_dict(exported["state_dict"])
    return model.eval(), exported["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (output_dir/name)")
    parser.add_argument("--step", type=int, help="the checkpoint's step; default: the newest complete one")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export/step_<N>.pt")
    args = parser.parse_args(argv)
    print(f"exported {export(args.run_dir, args.step, args.out)}")
    return 0


if __name__ == "__main__":
    run_command(main)
