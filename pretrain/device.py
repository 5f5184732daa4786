"""What the hardware can do: which precision to train in, and its peak FLOP/s for MFU."""

from __future__ import annotations

import torch

from data_pipeline.common.devices import device_name
from data_pipeline.common.errors import ConfigError

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s. Longer names first: the first
# name contained in the device's name wins.
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_here() -> torch.device:
    """The kind of device ranks started on this machine train on (for checks made before they start)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # On CPU, bf16 is only worth it where the matrix units do it natively (avx512_bf16, AMX).
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fp16_supported(device: torch.device) -> bool:
    # DeepSpeed's CPU accelerator has no fp16 (its loss scaler and kernels are GPU-only).
    return device.type == "cuda"


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to train in: the requested one, or for "auto" bf16 where supported and fp32 otherwise.
    Raises ConfigError for a 16-bit format the device lacks."""
    if requested == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    # bf16 runs on any CPU (emulated where the matrix units lack it); an old GPU (V100) has none.
    lacking = (requested == "fp16" and not fp16_supported(device)) or (
        requested == "bf16" and device.type == "cuda" and not bf16_supported(device)
    )
    if lacking:
        raise ConfigError(
            f"deepspeed.precision: {requested} is not supported on this {device.type}; use fp32 or auto"
        )
    return requested


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (a CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)
