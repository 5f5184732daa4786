"""Helpers for tests: a tiny run config and a way to start real training processes as a user would."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

# Small enough for a 2-rank DeepSpeed run in seconds on 2 CPU cores; in-context episodes only, so preparing
# the data takes about a second.
TINY_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "model": {"vocab_size": 512, "seq_len": 64, "n_layer": 2, "n_head": 4, "d_model": 64},
    "data": {"sources": [{"kind": "icl_episodes", "episodes": 2000, "pairs_per_episode": 16}], "val_fraction": 0.1},
    "train": {
        "global_batch_tokens": 2048,  # 2 ranks x 2 accumulation x 8 sequences x 64 tokens
        "micro_batch_size": 8,
        "max_steps": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "checkpoint_every": 4,
    },
    "deepspeed": {"zero_stage": 2, "precision": "fp32"},
    "eval": {"interval": 4, "batches": 2},
    "logging": {"wandb_mode": "disabled", "print_every": 1},
}


def deep_merge(base: dict, changes: dict) -> dict:
    """A new dict: `base` with `changes` merged in, section by section; neither input is modified."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        merged[key] = deep_merge(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def run_module(module: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m module args...` as a user would, capturing its output."""
    environment = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch(config: Path, *overrides: str, ranks: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Start a real training run with `ranks` DeepSpeed processes; fail the test with its output if it fails."""
    result = run_module("launch", "run", "--config", str(config), "--ranks", str(ranks), *overrides,
                        cwd=config.parent, timeout=timeout)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
