"""Whether a run fits in GPU memory, and how to split its batch, before it is submitted:

    python -m launch plan --config C --gpus N [--gpu-memory 80GiB] [KEY=VALUE ...]

For each ZeRO stage, with and without activation checkpointing: memory per GPU at the configured micro-batch
(parameters, gradients, optimizer state, activations, DeepSpeed's buffers), the largest micro-batch that fits and
the accumulation that follows, and one line of recommendation. `python -m launch run` refuses a run whose plan
does not fit the GPUs it sees (or `--gpu-memory`), with that line.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import ByteSize, TypeAdapter, ValidationError

from data_pipeline.common.command_line import at_least_one
from data_pipeline.common.errors import ConfigError
from pretrain.config import Config
from pretrain.memory import MemoryEstimate, ParameterCount, count_parameters, estimate

# A plan may fill this share of a GPU's memory: the CUDA context, the cuBLAS and NCCL workspaces and the caching
# allocator's fragmentation take the rest.
USABLE_FRACTION = 0.9
# Without a GPU here or --gpu-memory: the memory of the common data-centre GPUs (A100 80GB, H100).
DEFAULT_GPU_MEMORY = "80GiB"
GIB = 2**30


def parse_memory(text: str) -> int:
    """Bytes from '80GiB', '80 GB', '24000MiB' or a plain number of bytes."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 80GiB or 40GB") from None


def gpu_memory_here() -> int | None:
    """The memory of the smallest GPU on this host; None without one (or without nvidia-smi). Asked of
    nvidia-smi, not CUDA, so that the launcher holds no CUDA context on a GPU its ranks need."""
    if torch.cuda.device_count() == 0:
        return None
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return min(int(mebibytes) * 2**20 for mebibytes in listed) if listed else None


def gpu_precision(config: Config) -> str:
    """The precision a GPU run trains in: auto means bf16, which every GPU since Ampere has."""
    return "bf16" if config.deepspeed.precision == "auto" else config.deepspeed.precision


@dataclass(frozen=True)
class Option:
    """One ZeRO stage, with or without activation checkpointing."""

    at_configured_micro_batch: MemoryEstimate
    largest_micro_batch: int | None  # the largest that fits, among those that divide a rank's sequences per step


@dataclass(frozen=True)
class Plan:
    config: Config
    gpus: int
    gpu_memory: int
    precision: str
    parameters: ParameterCount
    sequences_per_rank: int
    options: list[Option]
    configured: MemoryEstimate
    recommendation: str

    @property
    def usable(self) -> int:
        return usable_memory(self.gpu_memory)

    @property
    def fits(self) -> bool:
        return self.configured.total <= self.usable


def usable_memory(gpu_memory: int) -> int:
    return int(gpu_memory * USABLE_FRACTION)


def gib(size: int) -> str:
    return f"{size / GIB:.2f}"


def describe(setting: MemoryEstimate, sequences_per_rank: int) -> str:
    checkpointing = " with activation checkpointing" if setting.checkpointing else ""
    return (f"ZeRO-{setting.zero_stage}{checkpointing} at micro-batch {setting.micro_batch_size}"
            f" (accumulation {sequences_per_rank // setting.micro_batch_size})")


def make_plan(config: Config, gpus: int, gpu_memory: int, precision: str) -> Plan:
    seq_len, tokens = config.model.seq_len, config.train.global_batch_tokens
    if tokens % (seq_len * gpus):
        raise ConfigError(f"train.global_batch_tokens: {tokens} is not a multiple of model.seq_len x GPUs ="
                          f" {seq_len} x {gpus}; pick a multiple of {seq_len * gpus}")
    sequences_per_rank = tokens // (seq_len * gpus)
    micro_batches = [size for size in range(1, sequences_per_rank + 1) if sequences_per_rank % size == 0]
    count = count_parameters(config.model)
    usable = usable_memory(gpu_memory)

    def at(stage: int, checkpointing: bool, micro_batch_size: int) -> MemoryEstimate:
        return estimate(config, count, gpus, precision, stage, checkpointing, micro_batch_size)

    options = []
    for checkpointing in (False, True):
        for stage in range(4):
            fitting = [size for size in micro_batches if at(stage, checkpointing, size).total <= usable]
            options.append(Option(at(stage, checkpointing, config.train.micro_batch_size), max(fitting, default=None)))
    knobs = config.deepspeed
    configured = at(knobs.zero_stage, knobs.activation_checkpointing, config.train.micro_batch_size)
    largest_fitting = {(option.at_configured_micro_batch.zero_stage, option.at_configured_micro_batch.checkpointing):
                       option.largest_micro_batch for option in options}
    recommendation = recommend(config, configured, largest_fitting, at, sequences_per_rank, gpu_memory)
    return Plan(config, gpus, gpu_memory, precision, count, sequences_per_rank, options, configured, recommendation)


def recommend(config: Config, configured: MemoryEstimate, largest_fitting: dict[tuple[int, bool], int | None],
              at: Callable[[int, bool, int], MemoryEstimate], sequences_per_rank: int, gpu_memory: int) -> str:
    """The plan's one line: whether the configured run fits, and if not the cheapest change that does: a smaller
    micro-batch, then more sharding, then recomputation."""
    knobs, micro_batch_size, usable = config.deepspeed, config.train.micro_batch_size, usable_memory(gpu_memory)
    needs = f"{describe(configured, sequences_per_rank)} needs {gib(configured.total)} GiB per GPU"
    room = f"{gib(usable)} GiB usable of {gib(gpu_memory)}"
    if configured.total <= usable:
        largest = largest_fitting[knobs.zero_stage, knobs.activation_checkpointing]
        if largest > micro_batch_size:
            return (f"fits: {needs}, {room}; train.micro_batch_size={largest} fits too"
                    f" (accumulation {sequences_per_rank // largest})")
        return f"fits: {needs}, {room}"
    ways_out = [(stage, knobs.activation_checkpointing) for stage in range(knobs.zero_stage, 4)]
    if not knobs.activation_checkpointing:
        ways_out += [(stage, True) for stage in range(knobs.zero_stage, 4)]
    for stage, checkpointing in ways_out:
        largest = largest_fitting[stage, checkpointing]
        if largest is None:
            continue
        changes = []
        if stage != knobs.zero_stage:
            changes.append(f"deepspeed.zero_stage={stage}")
        if checkpointing != knobs.activation_checkpointing:
            changes.append("deepspeed.activation_checkpointing=true")
        if largest != micro_batch_size:
            changes.append(f"train.micro_batch_size={largest}")
        fitted = at(stage, checkpointing, largest)
        return (f"does not fit: {needs}, {room}; use {' '.join(changes)} ({gib(fitted.total)} GiB, accumulation"
                f" {sequences_per_rank // largest})")
    return (f"does not fit: {needs}, {room}; even ZeRO-3 with activation checkpointing at micro-batch 1 needs"
            f" {gib(at(3, True, 1).total)} GiB; use more GPUs or GPUs with more memory")


def render(plan: Plan) -> str:
    config = plan.config
    lines = [
        f"{config.name}: {plan.parameters.total / 1e6:,.1f}M parameters (largest layer"
        f" {plan.parameters.largest_layer / 1e6:,.1f}M), {plan.precision}, {plan.gpus} GPU(s) of"
        f" {gib(plan.gpu_memory)} GiB ({gib(plan.usable)} usable)",
        f"global batch {config.train.global_batch_tokens:,} tokens = {plan.gpus} GPU(s) x {plan.sequences_per_rank}"
        f" sequences of {config.model.seq_len:,} tokens; configured: ZeRO-{config.deepspeed.zero_stage}, micro-batch"
        f" {config.train.micro_batch_size}",
        f"GiB per GPU at micro-batch {config.train.micro_batch_size}:",
        f"{'ZeRO':>4} {'ckpt':>4} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'buffers':>8} {'total':>8}"
        "  largest micro-batch that fits (accumulation)",
    ]
    for option in plan.options:
        row = option.at_configured_micro_batch
        largest = option.largest_micro_batch
        fitting = "none" if largest is None else f"{largest} ({plan.sequences_per_rank // largest})"
        lines.append(
            f"{row.zero_stage:>4} {'yes' if row.checkpointing else 'no':>4} {gib(row.parameters):>8}"
            f" {gib(row.gradients):>8} {gib(row.optimizer):>8} {gib(row.activations):>8} {gib(row.buffers):>8}"
            f" {gib(row.total):>8}  {fitting}"
        )
    lines.append(plan.recommendation)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the run will have, all nodes together")
    parser.add_argument("--gpu-memory", type=parse_memory,
                        help=f"memory of one GPU, e.g. 80GiB (default: this host's GPU, else {DEFAULT_GPU_MEMORY})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")


def plan_command(args: argparse.Namespace, config: Config) -> int:
    at_least_one("gpus", args.gpus)
    memory = args.gpu_memory or gpu_memory_here() or parse_memory(DEFAULT_GPU_MEMORY)
    print(render(make_plan(config, args.gpus, memory, gpu_precision(config))))
    return 0
