"""Training-step benchmark: the project's DeepSpeed path against a plain PyTorch loop, same model, same data.

    python -m pretrain.bench_step [--shapes gpt2-124m,gpt2-350m] [--steps 20] [--repeats 3] [--json bench.json]
    make bench ARGS="--shapes gpt2-124m --json bench.json"

For each shape, two paths train the same GPT (same seed) on the same random token ids, already on the device
(the data pipeline has its own benchmark, `make bench-data`):

- deepspeed: the training loop's own `build_engine` and `train_step` (ZeRO stage, precision, gradient
  accumulation, clipping, the project's AdamW), in a world of one started by `init_distributed`;
- baseline: plain PyTorch, no DeepSpeed: `torch.optim.AdamW` (fused on CUDA) over the same parameter groups,
  fp32 weights under bf16 autocast (when the precision is bf16), the same loss, micro-batches, accumulation and
  gradient clipping. With --compile, `torch.compile(model)` here and `deepspeed.compile=true` there.

Timing. Each path is built once. Then, for --repeats rounds, each path in turn (baseline, deepspeed, baseline,
deepspeed, ...) runs a block of --warmup-steps untimed steps and --steps timed ones, so a clock that drifts or a
noisy neighbour hits both. The device is synchronized before and after each timed step. A step's tokens/s is
its tokens over its seconds; reported are the median over all timed steps, MFU (the model's own FLOPs per
token x tokens/s over the device's dense bf16 peak; null where the peak is unknown, as on a CPU), and the
ratio deepspeed median / baseline median.

Memory. Both paths stay built side by side, so neither is rebuilt (or recompiled) each round. They fit: between
steps a path holds 12 (baseline) to about 20 (DeepSpeed, with its bf16 copy and fp32 gradient sums) bytes per
parameter, 4 and 7 GB at 350M against an H100's 80 GB; activations live only during a step. Since
torch.cuda.max_memory_allocated counts every tensor of the process, a path's peak is the peak during its blocks
minus what was allocated before either path was built (the token batches) and what the other path holds while
idle (measured once, after that path's first block). On a CPU peak memory is null: the process's peak RSS only
ever grows and covers both paths, so it cannot be split between them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from data_pipeline.common.command_line import ArgumentParser, run_command
from data_pipeline.common.devices import device_name, synchronize
from data_pipeline.common.errors import ConfigError, UserError
from data_pipeline.common.files import write_atomically
from pretrain.config import Config, load_config
from pretrain.device import peak_bf16_flops, resolve_precision
from pretrain.distributed import DistributedContext, init_distributed, shutdown
from pretrain.loss import next_token_loss
from pretrain.model import GPT
from pretrain.optim import parameter_groups
from pretrain.shapes import SHAPES
from pretrain.train import build_engine, train_step

DATA_SEED = 1234


DEFAULT_ACCUMULATION_STEPS = 4



def parse_args(argv: list[str] | None, on_cuda: bool) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pretrain.bench_step", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)}; default: "
                        "gpt2-124m,gpt2-350m on CUDA, tiny elsewhere")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path per round")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before each timed block")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each timing both paths in turn")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per forward pass; default: the shape's")
    parser.add_argument("--accumulation-steps", type=int, default=DEFAULT_ACCUMULATION_STEPS)
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="default: the config's")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile both paths; default: on for CUDA, off elsewhere")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)

    args.shapes = (args.shapes or ("gpt2-124m,gpt2-350m" if on_cuda else "tiny")).split(",")
    for name in args.shapes:
        if name not in SHAPES:
            raise ConfigError(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for option, minimum in (("steps", 1), ("warmup_steps", 0), ("repeats", 1), ("micro_batch_size", 1),
                            ("accumulation_steps", 1)):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise ConfigError(f"--{option.replace('_', '-')}: must be at least {minimum} (got {value})")
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise ConfigError(f"--json: the directory of {args.json} does not exist")  # found now, not after the run
    if args.compile is None:
        args.compile = on_cuda
    return args


def shape_config(name: str, args: argparse.Namespace) -> Config:
    shape = SHAPES[name]
    micro = args.micro_batch_size or shape.micro_batch_size
    overrides = [
        f"name=bench-{name}",
        f"model.n_layer={shape.n_layer}",
        f"model.n_head={shape.n_head}",
        f"model.d_model={shape.d_model}",
        f"model.seq_len={shape.seq_len}",
        f"model.vocab_size={shape.vocab_size}",
        f"train.micro_batch_size={micro}",
        # A world of one: the global batch is exactly the requested accumulation of micro-batches.
        f"train.global_batch_tokens={micro * args.accumulation_steps * shape.seq_len}",
        "deepspeed.precision=auto",
        f"deepspeed.compile={str(args.compile).lower()}",
    ]
    if args.zero_stage is not None:
        overrides.append(f"deepspeed.zero_stage={args.zero_stage}")
    return load_config(None, overrides)


class BaselinePath:
    """The same model and update in a plain PyTorch loop: what DeepSpeed's path is measured against."""

    def __init__(self, config: Config, device: torch.device, precision: str):
        torch.manual_seed(config.seed)
        self.model = GPT(config.model).to(device)
        self.parameters = self.model.num_parameters()
        self.flops_per_token = self.model.flops_per_token()
        train = config.train
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, train.weight_decay), lr=train.lr, betas=train.betas, eps=train.eps,
            fused=device.type == "cuda",
        )
        self.forward = torch.compile(self.model) if config.deepspeed.compile else self.model
        self.device_type = device.type
        self.autocast = precision == "bf16"
        self.grad_clip = train.grad_clip

    def step(self, micro_batches: list[torch.Tensor]) -> None:
        for batch in micro_batches:
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = next_token_loss(self.forward, batch, None)
            (loss / len(micro_batches)).backward()  # the mean over micro-batches, as DeepSpeed scales it
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


class DeepSpeedPath:
    """The training loop's own engine and step."""

    def __init__(self, config: Config, context: DistributedContext):
        self.setup = build_engine(config, config.batch_layout(context.world_size), context)
        self.parameters = self.setup.parameters
        self.flops_per_token = self.setup.flops_per_token

    def step(self, micro_batches: list[torch.Tensor]) -> None:
        train_step(self.setup.engine, self.setup.optimizer, micro_batches, masking=None)

    def close(self) -> None:
        self.setup.engine.destroy()  # releases the ZeRO optimizer's hooks and buffers


def run_block(path, micro_batches: list[torch.Tensor], warmup_steps: int, steps: int,
              device: torch.device) -> list[float]:
    """Seconds of each timed step, after `warmup_steps` untimed ones."""
    for _ in range(warmup_steps):
        path.step(micro_batches)
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        path.step(micro_batches)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_shape(name: str, config: Config, args: argparse.Namespace, context: DistributedContext) -> list[dict]:
    """Both paths on one shape, alternating timed blocks; one record per path."""
    device = context.device
    layout = config.batch_layout(context.world_size)
    precision = resolve_precision(config.deepspeed.precision, device)
    generator = torch.Generator().manual_seed(DATA_SEED)
    windows = torch.randint(config.model.vocab_size, (layout.sequences_per_rank, layout.seq_len + 1),
                            generator=generator)
    micro_batches = list(windows.to(device).split(layout.micro_batch_size))
    on_cuda = device.type == "cuda"

    builders = {"baseline": lambda: BaselinePath(config, device, precision),
                "deepspeed": lambda: DeepSpeedPath(config, context)}
    paths, facts = {}, {}
    seconds = {path_name: [] for path_name in builders}
    resident_bytes = {}  # what each built path holds between its steps
    allocated_at_start = torch.cuda.memory_allocated(device) if on_cuda else 0  # the token batches
    peak_bytes = {path_name: None for path_name in builders}
    try:
        for round_number in range(1, args.repeats + 1):
            for path_name, build in builders.items():
                if path_name not in paths:
                    allocated_before = torch.cuda.memory_allocated(device) if on_cuda else 0
                    paths[path_name] = build()
                    facts[path_name] = (paths[path_name].parameters, paths[path_name].flops_per_token)
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                block = run_block(paths[path_name], micro_batches, args.warmup_steps, args.steps, device)
                seconds[path_name] += block
                if on_cuda:
                    held_by_others = sum(resident_bytes.get(other, 0) for other in paths if other != path_name)
                    peak = torch.cuda.max_memory_allocated(device) - allocated_at_start - held_by_others
                    peak_bytes[path_name] = max(peak, peak_bytes[path_name] or 0)
                    if path_name not in resident_bytes:  # its first block, just after it was built
                        resident_bytes[path_name] = torch.cuda.memory_allocated(device) - allocated_before
                block_median = statistics.median(layout.tokens_per_step / s for s in block)
                print(f"{name} round {round_number}/{args.repeats} {path_name}: {block_median:,.0f} tokens/s",
                      flush=True)
    finally:
        for path in paths.values():
            path.close()
        del paths
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()  # compiled graphs keep this shape's code and buffers alive

    peak_flops = peak_bf16_flops(device)
    medians = {path_name: statistics.median(layout.tokens_per_step / s for s in seconds[path_name])
               for path_name in builders}
    records = []
    for path_name in builders:
        parameters, flops_per_token = facts[path_name]
        records.append({
            "shape": name,
            "path": path_name,
            "parameters": parameters,
            "flops_per_token": flops_per_token,
            "seq_len": layout.seq_len,
            "micro_batch_size": layout.micro_batch_size,
            "accumulation_steps": layout.accumulation_steps,
            "tokens_per_step": layout.tokens_per_step,
            "precision": precision,
            "zero_stage": config.deepspeed.zero_stage if path_name == "deepspeed" else None,
            "compile": config.deepspeed.compile,
            "step_tokens_per_second": [layout.tokens_per_step / s for s in seconds[path_name]],
            "tokens_per_second_median": medians[path_name],
            "mfu": flops_per_token * medians[path_name] / peak_flops if peak_flops else None,
            "peak_memory_bytes": peak_bytes[path_name],
            "ratio_to_baseline": medians[path_name] / medians["baseline"],
        })
    return records


def table(records: list[dict]) -> str:
    header = ("shape", "path", "parameters", "tokens/step", "tokens/s (median)", "MFU", "peak memory", "ratio")
    rows = [header]
    for r in records:
        rows.append((
            r["shape"],
            r["path"] + (f" (ZeRO-{r['zero_stage']})" if r["zero_stage"] is not None else ""),
            f"{r['parameters'] / 1e6:.1f}M",
            f"{r['tokens_per_step']:,}",
            f"{r['tokens_per_second_median']:,.0f}",
            "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
            "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
            f"{r['ratio_to_baseline']:.3f}",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, on_cuda=torch.cuda.is_available())
    configs = {name: shape_config(name, args) for name in args.shapes}  # every shape checked before any runs
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError("WORLD_SIZE: the benchmark is one process; start it with python -m, not a launcher")
    # As in training: ZeRO-3 calls collectives this torch deprecates, at every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    context = init_distributed(configs[args.shapes[0]].deepspeed)
    try:
        records = []
        for name in args.shapes:
            try:
                records += bench_shape(name, configs[name], args, context)
            except torch.cuda.OutOfMemoryError:
                micro = configs[name].train.micro_batch_size
                raise UserError(f"{name}: out of GPU memory at --micro-batch-size {micro}; lower it") from None
    finally:
        shutdown()

    device = context.device
    print(f"\n{device_name(device)}; torch {torch.__version__}, deepspeed {version('deepspeed')};"
          f" {args.repeats} rounds x {args.steps} timed steps per path; compile {'on' if args.compile else 'off'};"
          " ratio: tokens/s over the baseline's")
    print(table(records))
    if args.json:
        summary = {
            "device": device_name(device),
            "peak_bf16_flops": peak_bf16_flops(device),
            "torch": torch.__version__,
            "deepspeed": version("deepspeed"),
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", "pretrain.bench_step", *argv]),
            "records": records,
        }
        write_atomically(Path(args.json), json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    run_command(main)
