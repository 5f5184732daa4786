"""What a run runs on: how it was launched and the versions that decide its numbers (for its W&B config), and the
memory its process and device hold now (its `system/` metrics)."""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil
import torch

from data_pipeline.common.devices import device_name

GIB = 2**30


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def launch_details(run_dir: Path, world_size: int, device: torch.device) -> dict[str, Any]:
    """How this run was started, for the W&B config: the launch backend (from the newest record `python -m
    launch` wrote in the run directory), the nodes and ranks, and the versions that decide its numbers."""
    records = sorted((run_dir / "launches").glob("*.json"))
    submitted = [json.loads(path.read_text()) for path in records]
    # `launch node` records are written on each node by a SLURM or hostfile job; the submission says which.
    submission = next((record for record in reversed(submitted) if record["backend"] != "node"), None)
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return {
        "backend": submission["backend"] if submission else "torchrun",
        "record": records[-1].name if records else None,
        "hosts": submission["hosts"] if submission else [platform.node()],
        "nodes": max(1, world_size // ranks_per_node),
        "ranks_per_node": ranks_per_node,
        "world_size": world_size,
        "device": device_name(device),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **{name: _package_version(name) for name in ("deepspeed", "wandb", "webdataset", "tokenizers")},
        },
    }


def system_metrics(device: torch.device) -> dict[str, float]:
    """Memory (and GPU utilisation where NVML answers) of this process and its device, under `system/`."""
    values = {"system/cpu_memory_rss_gib": psutil.Process().memory_info().rss / GIB}
    if device.type == "cuda":
        values["system/gpu_memory_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        values["system/gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        values["system/gpu_memory_reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
        try:
            values["system/gpu_utilization_percent"] = float(torch.cuda.utilization(device))
        except (ModuleNotFoundError, RuntimeError):
            pass  # no NVML bindings here: the memory figures still stand
    return values
