"""Train a GPT with DeepSpeed. One process per rank, started by a launcher (`python -m launch run ...`):

    torchrun --nproc_per_node 2 -m pretrain.train --config configs/quickstart.yaml train.lr=1e-3

The loop, top to bottom: config -> ranks -> data -> model and engine -> resume -> steps (with validation and
checkpoints) -> final summary.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.cli import run_command
from data_pipeline.errors import DataError
from data_pipeline.loader import (
    TrainBatches,
    Windows,
    document_ids,
    iterate_steps,
    validation_batches,
    verify_shards,
)
from data_pipeline.prepare import Manifest, prepare
from data_pipeline.tokenizer import load_tokenizer
from evals.fewshot import evaluate as evaluate_fewshot
from evals.report import metrics_for_logging
from evals.tasks import TaskError, load_tasks
from pretrain import checkpoint
from pretrain.config import BatchLayout, Config, deepspeed_config, load_config
from pretrain.data import prepare_and_verify
from pretrain.device import peak_bf16_flops, resolve_precision
from pretrain.distributed import (
    DistributedContext,
    RankZeroFailed,
    init_distributed,
    mean_across_ranks,
    means_across_ranks,
    on_main_first,
    shutdown,
)
from pretrain.faults import NonFiniteSteps, Preempted, PreemptionWatch, TrainingStopped
from pretrain.metrics import RunLogger, launch_details, read_metrics, system_metrics
from pretrain.model import GPT
from pretrain.optim import SkippingAdamW, lr_multiplier, parameter_groups


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config; the defaults of the schema if omitted")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    return parser.parse_args(argv)


def next_token_loss(engine, windows: torch.Tensor, end_of_document_id: int | None) -> torch.Tensor:
    """Mean loss of predicting each window's next tokens. With an end-of-document id, attention stays
    within each document (data.document_masking)."""
    ids = None if end_of_document_id is None else document_ids(windows, end_of_document_id)
    logits = engine(windows[:, :-1], ids)
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def validation_loss(engine, batches: list[torch.Tensor], context: DistributedContext, masking: int | None) -> float:
    engine.eval()
    total = 0.0
    for batch in batches:
        total += next_token_loss(engine, batch.to(context.device), masking).item()
    engine.train()
    return mean_across_ranks(total / len(batches), context.device)


def seed_step(seed: int, step: int, rank: int) -> None:
    # Randomness (dropout) is a function of (seed, step, rank), so a resumed run draws what the uninterrupted
    # one drew without carrying generator state in the checkpoint.
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def prepare_run_dir(config: Config, context: DistributedContext) -> None:
    """Create the run directory and save the resolved config, keeping any earlier config beside it."""
    run_dir = config.run_dir
    checkpoint.refuse_to_train_over_checkpoints(config)
    if not context.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved, saved = config.to_yaml(), run_dir / "config.yaml"
    if saved.exists() and saved.read_text() != resolved:
        saved.rename(run_dir / f"config.until-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    saved.write_text(resolved)


@dataclass
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
    import deepspeed

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
    return EngineSetup(engine, optimizer, scheduler, precision, ds_config, parameters, non_embedding_parameters,
                  model.flops_per_token())


def train_step(engine, optimizer: SkippingAdamW, micro_batches, masking: int | None, poison: bool = False):
    """Forward and backward over one step's micro-batches and the optimizer update; returns the summed
    micro-batch losses (a tensor, so the device is not stalled). `poison` makes the loss NaN (a fault drill)."""
    loss_sum = torch.zeros((), device=micro_batches[0].device)
    optimizer.begin_step()
    for batch in micro_batches:
        loss = next_token_loss(engine, batch, masking)
        if poison:
            loss = loss * torch.nan
        optimizer.observe_loss(loss)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates the weights only at the accumulation boundary
        loss_sum += loss.detach()
    return loss_sum


def train(config: Config, layout: BatchLayout, context: DistributedContext) -> None:
    # From here on a preemption signal is recorded, and acted on after the next step, instead of killing the rank.
    preemption = PreemptionWatch()
    say = context.print
    run_dir = config.run_dir
    resume_from = checkpoint.starting_checkpoint(config)
    prepare_run_dir(config, context)

    # Data: rank 0 prepares (once) and verifies the shards, the other ranks then open what it checked.
    data = on_main_first(context, functools.partial(prepare_and_verify, config, context.is_main, say))
    if data.tokenizer_vocab_size > config.model.vocab_size:
        raise DataError(
            f"{data.tokenizer_path}: has {data.tokenizer_vocab_size} tokens, more than model.vocab_size="
            f"{config.model.vocab_size}; raise model.vocab_size"
        )
    windows = {split: Windows(data, split, layout.seq_len, config.data.shard_url) for split in ("train", "val")}
    train_batches = TrainBatches(windows["train"], layout, context.rank, config.data.shuffle_blocks, config.seed)
    val_batches = validation_batches(windows["val"], layout, context.rank, config.eval.batches)
    masking = data.end_of_document_id if config.data.document_masking else None
    fewshot = config.eval.fewshot
    # Loaded before the engine is built, so a bad task file stops the run before any work is spent.
    fewshot_tasks = load_tasks(
        fewshot.tasks, items=fewshot.items_in_loop or fewshot.items, example_delimiter=fewshot.example_delimiter,
        target_delimiter=fewshot.target_delimiter,
    ) if fewshot.interval else []
    tokenizer = load_tokenizer(data.tokenizer_path, config.model.vocab_size) if fewshot_tasks else None

    # A checkpoint from another number of ranks resumes through DeepSpeed's universal form, converted once.
    universal = resume_from is not None and checkpoint.resume_plan(
        resume_from, context.world_size, config.deepspeed.zero_stage)
    if universal:
        on_main_first(context, functools.partial(checkpoint.convert_to_universal, resume_from))
    setup = build_engine(config, layout, context, load_universal=universal)
    engine, optimizer, scheduler, precision = setup.engine, setup.optimizer, setup.scheduler, setup.precision
    if context.is_main:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(setup.ds_config, indent=2) + "\n")

    start_step, skipped_before = 0, 0
    if resume_from is not None:
        loop_state = checkpoint.load(engine, resume_from, universal)
        if loop_state["data_fingerprint"] != data.fingerprint:
            raise DataError(
                f"{resume_from}: was trained on other data (fingerprint"
                f" {loop_state['data_fingerprint'][:12]}, now {data.fingerprint[:12]}); restore data.dir or start a"
                " new run"
            )
        start_step = loop_state["step"]
        # DeepSpeed keeps a "skipped_steps" of its own in the same state; absent from checkpoints made before this.
        skipped_before = loop_state.get("non_finite_steps_skipped", 0)
        written_by = checkpoint.read_marker(resume_from)["world_size"]
        own = resume_from.parent.parent == run_dir
        say(f"{'resumed from ' + resume_from.name if own else f'branched from {resume_from}'} (step {start_step})" + (
            f", written by {written_by} ranks, through its universal form" if universal else ""))
    launch = launch_details(run_dir, context.world_size, context.device) if context.is_main else None
    with RunLogger(config, context.is_main, start_step if resume_from else None, launch) as logger:
        peak_flops = peak_bf16_flops(context.device)
        say(
            f"{config.name}: {setup.parameters:,} parameters ({setup.non_embedding_parameters:,} without embeddings)"
            f", {context.world_size} rank(s) on {context.device.type}, {precision}, ZeRO-"
            f"{config.deepspeed.zero_stage}, {layout.tokens_per_step:,} tokens/step ="
            f" {layout.world_size} ranks x {layout.accumulation_steps} accumulation x {layout.micro_batch_size}"
            f" x {layout.seq_len}, run directory {run_dir}"
        )
        if start_step == 0:
            logger.log(0, {"val/loss": validation_loss(engine, val_batches, context, masking), "train/tokens": 0})

        non_finite = NonFiniteSteps(config.faults.max_consecutive_skipped_steps, run_dir, skipped_before)
        max_steps = config.train.max_steps
        steps = iterate_steps(train_batches, start_step, max_steps, config.data.loader_workers)
        for step in range(start_step, max_steps):
            seed_step(config.seed, step, context.rank)
            lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
            step_start = time.perf_counter()
            loaded_step, (tokens, _window_ids) = next(steps)
            assert loaded_step == step, f"loader delivered step {loaded_step} for step {step}"
            micro_batches = tokens.to(context.device, non_blocking=True).split(layout.micro_batch_size)
            data_wait = time.perf_counter() - step_start
            done = step + 1
            poison = done in config.faults.nan_loss_at_steps and context.is_main
            loss_sum = train_step(engine, optimizer, micro_batches, masking, poison)
            # One collective for the step's loss and the preemption vote (any rank that got a signal stops them all).
            train_loss, stop_votes = means_across_ranks(
                [loss_sum / layout.accumulation_steps, float(preemption.received is not None)], context.device)
            step_seconds = time.perf_counter() - step_start
            tokens_per_second = layout.tokens_per_step / step_seconds
            skipped = optimizer.skipped or not engine.was_step_applied()
            # Under fp16, DeepSpeed's loss scaler also skips steps whose scaled gradients overflowed while it finds
            # its scale; those are routine, not a sign of divergence.
            loss_scaler_skip = precision == "fp16" and not optimizer.skipped and math.isfinite(train_loss)
            non_finite.record(skipped and not loss_scaler_skip)
            if non_finite.in_a_row == 1:  # once per streak; a streak too long stops the run below
                logger.alert("non-finite loss", f"step {done}: loss {train_loss} (or its gradient) is not finite; the"
                             f" step was skipped ({non_finite.total} skipped so far)")
            metrics = {
                "train/loss": train_loss,
                "train/lr": lr,
                # DeepSpeed computes the norm inside its ZeRO and mixed-precision optimizers, not at stage 0 in fp32.
                "train/grad_norm": None if (grad_norm := engine.get_global_grad_norm()) is None else float(grad_norm),
                "train/tokens": done * layout.tokens_per_step,
                "train/skipped_steps": non_finite.total,
                "perf/tokens_per_second": tokens_per_second,
                "perf/mfu": (setup.flops_per_token * tokens_per_second / (peak_flops * context.world_size)
                             if peak_flops else None),
                "perf/step_seconds": step_seconds,
                "perf/data_wait_fraction": data_wait / step_seconds,
            }
            if (config.eval.interval and done % config.eval.interval == 0) or done == max_steps:
                metrics["val/loss"] = validation_loss(engine, val_batches, context, masking)
            if fewshot_tasks and (done % fewshot.interval == 0 or done == max_steps):
                # Every rank scores its share of the items; every rank gets the whole table back.
                scores = evaluate_fewshot(
                    engine.module, tokenizer, fewshot_tasks, fewshot.shots, context_length=config.model.seq_len,
                    end_of_document_id=data.end_of_document_id, seed=fewshot.seed, batch_size=fewshot.batch_size,
                    max_new_tokens=fewshot.max_new_tokens,
                )
                metrics.update(metrics_for_logging(scores))
                for task in fewshot_tasks:
                    curve = ", ".join(f"k={score.k} {score.acc:.2f}" for score in scores if score.task == task.name)
                    say(f"step {done} few-shot {task.name}: {curve}")
            report_now = done % config.logging.print_every == 0 or done == max_steps
            if report_now:
                metrics.update(system_metrics(context.device))
            logger.log(done, metrics)
            if report_now:
                say(
                    f"step {done}/{max_steps} | loss {train_loss:.4f} | lr {lr:.2e}"
                    f" | {tokens_per_second:,.0f} tokens/s | data wait {metrics['perf/data_wait_fraction']:.1%}"
                    + (f" | val loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else "")
                )
            non_finite.stop_if_too_many(done)  # before saving: the newest checkpoint stays a good one
            preempted_by = (preemption.received or "a signal to another rank") if stop_votes > 0 else None
            if (done % config.train.checkpoint_every == 0 or done == max_steps or done in config.train.checkpoint_steps
                    or preempted_by):
                loop_state = {"step": done, "data_fingerprint": data.fingerprint,
                              "non_finite_steps_skipped": non_finite.total}
                saved = checkpoint.save(engine, run_dir, done, loop_state, keep=config.train.keep_checkpoints,
                                        preempted_by=preempted_by, spare=config.train.checkpoint_steps)
            if preempted_by and done < max_steps:
                raise Preempted(
                    f"{preempted_by} asked to stop: saved {saved} at step {done}; resume with train.resume=auto"
                    " (launchers requeue on this exit code)"
                )

    validation = [(r["step"], r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r] if context.is_main else []
    if validation:
        (first_step, first_loss), (last_step, last_loss) = validation[0], validation[-1]
        say(f"validation loss: {first_loss:.4f} at step {first_step} -> {last_loss:.4f} at step {last_step}")
    say(f"run directory: {run_dir} (metrics.jsonl, checkpoints/, config.yaml, wandb/)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # DeepSpeed's ZeRO-3 calls collectives this torch deprecates, at every step; the notice is for DeepSpeed's
    # developers, not for someone watching a run.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    config = load_config(args.config, args.overrides)
    context = init_distributed(config.deepspeed.timeout_minutes)
    try:
        train(config, config.batch_layout(context.world_size), context)
    finally:
        shutdown()


if __name__ == "__main__":
    run_command(main)
