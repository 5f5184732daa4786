"""What a device is called in every record and benchmark, and waiting for the work queued on it."""

from __future__ import annotations

import platform

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with "(CPU)", as benchmarks and run records show it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"{model or platform.processor() or platform.machine()} (CPU)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a CUDA stream runs ahead of the host; a CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
