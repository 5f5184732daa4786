"""Train a GPT with DeepSpeed. One process per rank, started by a launcher (`python -m launch run ...`):

    torchrun --nproc_per_node 2 -m pretrain.train --config configs/quickstart.yaml train.lr=1e-3

Top to bottom: config -> ranks -> `set_up` (data, few-shot tasks, model and engine, resume) -> the step loop
in `train` -> final summary. Around each step, components decide for themselves whether it is their time and
return the metrics they measured: the validator and the few-shot evaluator (pretrain/evaluation.py), the
non-finite guard and the preemption vote (pretrain/faults.py), progress and system metrics (pretrain/progress.py)
and the checkpointer (pretrain/checkpointer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline.common.command_line import ArgumentParser, run_command
from data_pipeline.common.errors import DataError
from data_pipeline.common.files import write_atomically
from data_pipeline.loader import TrainBatches, iterate_steps, validation_batches
from data_pipeline.remote import Fetcher
from data_pipeline.shard_reader import Windows
from data_pipeline.tokenizer import load_tokenizer
from evals.benchmarks import load_evaluation_tasks
from evals.fewshot import refuse_what_cannot_be_scored
from pretrain.checkpointer import Checkpointer, DataPosition, Ranks, Resumption
from pretrain.config import BatchLayout, Config, deepspeed_config, load_config
from pretrain.device import peak_bf16_flops, resolve_precision
from pretrain.distributed import (
    DistributedContext,
    init_distributed,
    mean_across_ranks,
    means_across_ranks,
    on_main_first,
    problems_across_ranks,
    shutdown,
)
from pretrain.environment import launch_details
from pretrain.evaluation import FewShotEvaluator, Validator
from pretrain.faults import LossSpikes, NonFiniteGuard, PreemptionWatch
from pretrain.loss import next_token_loss
from pretrain.model import GPT
from pretrain.optim import SkippingAdamW, lr_multiplier, parameter_groups
from pretrain.progress import Progress
from pretrain.run_data import DataOrder, prepare_and_verify
from pretrain.run_logger import RunLogger
from pretrain.rundir.reader import read_metrics
from pretrain.runlock import RunLock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config; the defaults of the schema if omitted")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    return parser.parse_args(argv)


def seed_step(seed: int, step: int, rank: int) -> None:
    # Randomness (dropout) is a function of (seed, step, rank), so a resumed run draws what the uninterrupted
    # one drew without carrying generator state in the checkpoint.
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def prepare_run_dir(config: Config, context: DistributedContext) -> None:
    """Create the run directory and save the resolved config, keeping any earlier config beside it."""
    run_dir = config.run_dir
    if not context.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved, saved = config.to_yaml(), run_dir / "config.yaml"
    if saved.exists() and saved.read_text() != resolved:
        saved.rename(run_dir / f"config.until-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    write_atomically(saved, resolved)


@dataclass(kw_only=True)
class EngineSetup:
    """A DeepSpeed engine around the model, with what the loop needs to know about it."""

    engine: object  # deepspeed.DeepSpeedEngine; called and stepped like the model
    optimizer: SkippingAdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: str
    ds_config: dict
    parameters: int
    non_embedding_parameters: int
    flops_per_token: int


def build_engine(config: Config, layout: BatchLayout, context: DistributedContext,
                 load_universal: bool = False) -> EngineSetup:
    """Model, optimizer, schedule and DeepSpeed engine, as configured. The same seed on every rank gives every
    rank the same initial weights. `load_universal`: the engine will load a universal checkpoint."""
    import deepspeed  # deferred: seconds to import; the config and the data are checked before it is paid for

    torch.manual_seed(config.seed)
    checkpoint_blocks = deepspeed.checkpointing.checkpoint if config.deepspeed.activation_checkpointing else None
    model = GPT(config.model, checkpoint_blocks)
    # Counted before ZeRO-3 partitions the weights, after which each rank holds only a slice.
    parameters, non_embedding_parameters = model.num_parameters(), model.num_parameters(include_embeddings=False)
    optimizer = SkippingAdamW(
        parameter_groups(model, config.train.weight_decay),
        lr=config.train.lr,
        betas=config.train.betas,
        eps=config.train.eps,
        fused=context.device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_multiplier, train=config.train))
    precision = resolve_precision(config.deepspeed.precision, context.device)
    ds_config = deepspeed_config(config, layout, precision)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if config.deepspeed.compile:
        engine.compile()
    return EngineSetup(engine=engine, optimizer=optimizer, scheduler=scheduler, precision=precision,
                       ds_config=ds_config, parameters=parameters, non_embedding_parameters=non_embedding_parameters,
                       flops_per_token=model.flops_per_token())


def train_step(engine, optimizer: SkippingAdamW, micro_batches, masking: int | None, z_loss: float = 0.0,
               poison: bool = False):
    """Forward and backward over one step's micro-batches and the optimizer update; returns the summed
    micro-batch losses (a tensor, so the device is not stalled). `poison` makes the loss NaN (a fault drill)."""
    loss_sum = torch.zeros((), device=micro_batches[0].device)
    optimizer.begin_step()
    for batch in micro_batches:
        loss = next_token_loss(engine, batch, masking, z_loss)
        if poison:
            loss = loss * torch.nan
        optimizer.observe_loss(loss)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates the weights only at the accumulation boundary
        loss_sum += loss.detach()
    return loss_sum


@dataclass(kw_only=True)
class Run:
    """What the step loop works with, built by `set_up`: the engine, this rank's data, where the run starts,
    and the components that each decide when to act around a step."""

    setup: EngineSetup
    train_batches: TrainBatches
    masking: int | None  # the end-of-document id with data.document_masking, else None
    resumption: Resumption
    launch: dict | None  # how the run was started, for W&B (rank 0)
    validator: Validator
    fewshot: FewShotEvaluator
    guard: NonFiniteGuard
    spikes: LossSpikes
    progress: Progress
    checkpointer: Checkpointer


def set_up(config: Config, layout: BatchLayout, context: DistributedContext) -> Run:
    """Data, few-shot tasks, the engine and the checkpoint to resume, in the order in which a failure costs
    least; then the components of the loop."""
    say = context.print
    run_dir = config.run_dir
    ranks = Ranks(context.rank, context.world_size, functools.partial(on_main_first, context),
                  functools.partial(problems_across_ranks, context))
    checkpointer = Checkpointer.from_config(config, ranks)
    resumption = checkpointer.plan_resume(config, lambda problem: say(f"warning: {problem}"))
    prepare_run_dir(config, context)

    # Data: rank 0 prepares (once) and verifies the shards, the other ranks then open what it checked.
    data = on_main_first(context, functools.partial(prepare_and_verify, config, context.is_main, say))
    if data.tokenizer_vocab_size > config.model.vocab_size:
        raise DataError(
            f"{data.tokenizer_path}: has {data.tokenizer_vocab_size} tokens, more than model.vocab_size="
            f"{config.model.vocab_size}; raise model.vocab_size"
        )
    check_on_read = config.data.verify == "on_read"
    fetcher = Fetcher.from_config(config.data)
    windows = {split: Windows(data, split, layout.seq_len, config.data.shard_url, check_on_read, fetcher)
               for split in ("train", "val")}
    train_batches = TrainBatches(windows["train"], layout, context.rank, config.data.shuffle_blocks, config.seed,
                                 resumption.position, config.data.mix_shards)
    val_batches = validation_batches(windows["val"], layout, context.rank, config.eval.batches)
    masking = data.end_of_document_id if config.data.document_masking else None
    fewshot = config.eval.fewshot
    # Loaded before the engine is built, so a bad task file stops the run before any work is spent.
    fewshot_tasks = load_evaluation_tasks(
        fewshot.tasks, items=fewshot.items_in_loop or fewshot.items, benchmarks_dir=fewshot.benchmarks_dir,
        example_delimiter=fewshot.example_delimiter, target_delimiter=fewshot.target_delimiter,
    ) if fewshot.interval else []
    tokenizer = load_tokenizer(data.tokenizer_path, config.model.vocab_size) if fewshot_tasks else None
    if fewshot_tasks:
        refuse_what_cannot_be_scored(fewshot_tasks, fewshot.shots, tokenizer, config.model.seq_len)

    setup = build_engine(config, layout, context, load_universal=resumption.universal)
    if context.is_main:
        write_atomically(run_dir / "deepspeed_config.json", json.dumps(setup.ds_config, indent=2) + "\n")

    guard = NonFiniteGuard.from_config(config, setup.precision, context.is_main)
    spikes = LossSpikes.from_config(config)
    checkpointer.register(data=DataPosition(data.fingerprint, DataOrder.of(config), train_batches.tokens_before),
                          non_finite_steps=guard, loss_spikes=spikes)
    checkpointer.resume(setup.engine, resumption, say)
    max_steps = config.train.max_steps
    return Run(
        setup=setup, train_batches=train_batches, masking=masking, resumption=resumption,
        launch=launch_details(run_dir, context.world_size, context.device) if context.is_main else None,
        validator=Validator(val_batches, context.device, masking, config.eval.interval, max_steps,
                            functools.partial(mean_across_ranks, device=context.device)),
        fewshot=FewShotEvaluator(fewshot_tasks, tokenizer, fewshot, config.model.seq_len, data.end_of_document_id,
                                 max_steps, say),
        guard=guard,
        spikes=spikes,
        progress=Progress(layout.tokens_per_step, setup.flops_per_token, peak_bf16_flops(context.device),
                          context.world_size, config.logging.print_every, max_steps, context.device),
        checkpointer=checkpointer,
    )


def describe(config: Config, layout: BatchLayout, context: DistributedContext, setup: EngineSetup) -> str:
    return (
        f"{config.name}: {setup.parameters:,} parameters ({setup.non_embedding_parameters:,} without embeddings)"
        f", {context.world_size} rank(s) on {context.device.type}, {setup.precision}, ZeRO-"
        f"{config.deepspeed.zero_stage}, {layout.tokens_per_step:,} tokens/step ="
        f" {layout.world_size} ranks x {layout.accumulation_steps} accumulation x {layout.micro_batch_size}"
        f" x {layout.seq_len}, run directory {config.run_dir}"
    )


def next_micro_batches(steps, step: int, layout: BatchLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    loaded_step, (tokens, _window_ids) = next(steps)
    assert loaded_step == step, f"loader delivered step {loaded_step} for step {step}"
    return tokens.to(device, non_blocking=True).split(layout.micro_batch_size)


def global_grad_norm(engine) -> float | None:
    # DeepSpeed computes the norm inside its ZeRO and mixed-precision optimizers, not at stage 0 in fp32.
    grad_norm = engine.get_global_grad_norm()
    return None if grad_norm is None else float(grad_norm)


def train(config: Config, layout: BatchLayout, context: DistributedContext, preemption: PreemptionWatch) -> None:
    run = set_up(config, layout, context)
    engine, optimizer, max_steps = run.setup.engine, run.setup.optimizer, config.train.max_steps
    start_step = run.resumption.step
    # The step stream is closed on the way out, an error's way too: its reader processes ignore stop signals, so a
    # rank that left them running would wait for them at exit until something kills it (torchrun: 30 s later).
    with (RunLogger(config, context.is_main, run.resumption.step if run.resumption.checkpoint else None,
                    run.launch) as logger,
          contextlib.closing(iterate_steps(run.train_batches, start_step, max_steps,
                                           config.data.loader_workers)) as steps):
        context.print(describe(config, layout, context, run.setup))
        if start_step == 0:
            logger.log(0, {**run.validator.validate(engine), "train/tokens": 0})
        preemption.start_training()
        for step in range(start_step, max_steps):
            seed_step(config.seed, step, context.rank)
            lr = run.setup.scheduler.get_last_lr()[0]  # the rate this step's update uses
            step_start = time.perf_counter()
            micro_batches = next_micro_batches(steps, step, layout, context.device)
            data_wait = time.perf_counter() - step_start
            done = step + 1
            loss_sum = train_step(engine, optimizer, micro_batches, run.masking, config.train.z_loss,
                                  run.guard.poisons(done))
            # One collective for the step's loss and the preemption vote (any rank that got a signal stops them all).
            train_loss, stop_votes = means_across_ranks(
                [loss_sum / layout.accumulation_steps, preemption.vote()], context.device)
            step_seconds = time.perf_counter() - step_start
            alert = run.guard.record(done, train_loss, optimizer.skipped, engine.was_step_applied())
            run.spikes.record(train_loss)
            if alert is not None:
                logger.alert("non-finite loss", alert)
            metrics = {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": global_grad_norm(engine),
                       "train/tokens": run.train_batches.tokens_before(done), **run.guard.metrics(),
                       **run.spikes.metrics(), **run.progress.step_metrics(step_seconds, data_wait)}
            if run.validator.due(done):
                metrics.update(run.validator.validate(engine))
            if run.fewshot.due(done):
                metrics.update(run.fewshot.evaluate(engine.module, done))
            report_now = run.progress.due(done)
            if report_now:
                metrics.update(run.progress.system_metrics())
            logger.log(done, metrics)
            if report_now:
                context.print(run.progress.line(done, metrics))
            run.guard.stop_if_too_many(done)  # before saving: the newest checkpoint stays a good one
            run.checkpointer.save(engine, done, preemption.agreed(stop_votes))
    summarize(config.run_dir, context)


def summarize(run_dir: Path, context: DistributedContext) -> None:
    if not context.is_main:
        return
    validation = [(record["step"], record["val/loss"]) for record in read_metrics(run_dir) if "val/loss" in record]
    if validation:
        (first_step, first_loss), (last_step, last_loss) = validation[0], validation[-1]
        context.print(f"validation loss: {first_loss:.4f} at step {first_step} -> {last_loss:.4f} at step {last_step}")
    context.print(f"run directory: {run_dir} (metrics.jsonl, checkpoints/, config.yaml, wandb/)")


def main(argv: list[str] | None = None) -> None:
    # From here a stop signal ends start-up at once, and once training has begun ends it after a checkpoint.
    preemption = PreemptionWatch()
    args = parse_args(argv)
    # DeepSpeed's ZeRO-3 calls collectives this torch deprecates, at every step; the notice is for DeepSpeed's
    # developers, not for someone watching a run.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    config = load_config(args.config, args.overrides)
    context = init_distributed(config.deepspeed)
    try:
        # Rank 0 holds the run directory from here to the end; a second job training the same run is refused.
        with on_main_first(context, functools.partial(RunLock.take, config.run_dir, holds=context.is_main)):
            train(config, config.batch_layout(context.world_size), context, preemption)
    finally:
        shutdown()


if __name__ == "__main__":
    run_command(main)
