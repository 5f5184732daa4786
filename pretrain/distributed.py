"""Process-group setup and the few collectives the training loop needs.

Ranks are started by a launcher (torchrun, the DeepSpeed launcher) that sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, or as SLURM tasks (RANK and the rest come from SLURM's variables). A plain
`python -m pretrain.train` is a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from data_pipeline.common.errors import UserError
from data_pipeline.common.network import free_port
from pretrain.config import DeepSpeedConfig
from pretrain.device import pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # Where the other ranks wait for rank 0's start-up work: a group of its own with a long timeout, so that
    # hours of verifying a corpus do not run into the timeout meant for a rank that died mid-step.
    startup_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """Rank 0 speaks; the others stay quiet."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def init_distributed(settings: DeepSpeedConfig) -> DistributedContext:
    import deepspeed  # deferred: importing it is slow, and the config can be checked without it

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        # One SLURM task per rank (srun without torchrun): SLURM numbers the tasks, the sbatch script exports
        # the address of the first node.
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          WORLD_SIZE=os.environ["SLURM_NTASKS"])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(local_rank)
    # A rank that dies must not leave the others waiting forever in a collective.
    deepspeed.init_distributed(timeout=timedelta(minutes=settings.timeout_minutes), auto_mpi_discovery=False)
    startup_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=settings.startup_timeout_minutes))
    return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device, startup_group)


def shutdown() -> None:
    # Tearing the group down explicitly avoids an occasional abort at interpreter exit (`terminate called without
    # an active exception`, about one launch in 45 on CPU with gloo).
    if dist.is_initialized():
        dist.destroy_process_group()


def means_across_ranks(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Each value's mean over the ranks, in one all-reduce."""
    tensor = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device) for value in values])
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def mean_across_ranks(value: float | torch.Tensor, device: torch.device) -> float:
    return means_across_ranks([value], device)[0]


class RankZeroFailed(UserError):
    """Raised on the other ranks when rank 0 failed at work they wait for; rank 0 reports the cause."""

    every_rank_speaks = False


def on_main_first(context: DistributedContext, work: Callable[[], T]) -> T:
    """Run `work` on rank 0, then on the others (which then find its side effects, such as prepared data).

    A failure on rank 0 is raised there and reaches the others as RankZeroFailed, so no rank waits at a
    barrier for a rank that already failed. The others wait up to deepspeed.startup_timeout_minutes.
    """
    result, failure = None, None
    if context.is_main:
        try:
            result = work()
        except Exception as error:  # re-raised below, after the other ranks have heard of it
            failure = error
    message = [f"{type(failure).__name__}: {failure}" if failure else None]
    dist.broadcast_object_list(message, src=0, group=context.startup_group)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise RankZeroFailed(message[0])
    return result if context.is_main else work()


def problems_across_ranks(context: DistributedContext, problem: str | None) -> list[str]:
    """Every rank's problem (None for none), gathered on every rank, so that all decide alike on what one found.
    On the start-up group: reading a large checkpoint back may keep a rank longer than a step's timeout."""
    gathered: list[str | None] = [None] * context.world_size
    dist.all_gather_object(gathered, problem, group=context.startup_group)
    return [found for found in gathered if found is not None]
