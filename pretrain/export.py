"""Export a checkpoint as one file of whole fp32 weights, for evaluation and other tools:

    python -m pretrain.export runs/quickstart [--step N] [--out PATH]

Whatever ZeRO stage and number of ranks wrote the checkpoint, the file holds {"model": the run's model config,
"state_dict": fp32 weights by parameter name, "step": N}. `load_exported` turns it back into a GPT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.common.command_line import ArgumentParser, run_command
from data_pipeline.common.files import write_atomically
from pretrain.checkpoint_store import tag_for_step
from pretrain.config import ModelConfig
from pretrain.model import GPT
from pretrain.rundir.reader import load_checkpoint


def export(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    trained = load_checkpoint(run_dir, step)
    out = out or run_dir / "export" / f"{tag_for_step(trained.step)}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    exported = {
        "model": trained.config.model.model_dump(mode="json"),
        "state_dict": trained.model.state_dict(),
        "step": trained.step,
    }
    return write_atomically(out, lambda path: torch.save(exported, path))


def load_exported(path: Path) -> tuple[GPT, int]:
    """The exported model (on the CPU, in eval mode) and the step it was trained to."""
    exported = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(ModelConfig.model_validate(exported["model"]))
    model.load_state_dict(exported["state_dict"])
    return model.eval(), exported["step"]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (output_dir/name)")
    parser.add_argument("--step", type=int, help="the checkpoint's step; default: the newest complete one")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export/step_<N>.pt")
    args = parser.parse_args(argv)
    print(f"exported {export(args.run_dir, args.step, args.out)}")
    return 0


if __name__ == "__main__":
    run_command(main)
