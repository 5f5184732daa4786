"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock

from data_pipeline.common.command_line import run_command
from pretrain.config import merged
from tests.helpers import TINY_CONFIG, launch, losses_by_step

# The workers and the training processes they start outnumber the cores: one thread each, inherited by every
# process a test starts, so that no OpenMP thread spins waiting for a partner the kernel has descheduled (a packing
# test took 95 s in the suite against 5 s alone).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Steps of every shared run: enough for the loss to fall, few enough that a launch costs little more than its start.
SHARED_RUN_STEPS = 6


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Write the tiny config (with `changes` merged in) under tmp_path; return its path."""

    def write(changes: dict | None = None, name: str = "config.yaml") -> Path:
        config = merged(TINY_CONFIG, changes or {})
        config.setdefault("output_dir", str(tmp_path / "runs"))
        config["data"].setdefault("dir", str(tmp_path / "data"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return write


class SharedRuns:
    """Tiny runs, each launched once per session on first use and then only read, by ZeRO stage, number of ranks
    and DeepSpeed option. They share one prepared dataset (which `prepare` locks while it writes it). Under
    pytest-xdist the workers share them too: a lock per run, so that the first worker to need a run trains it and
    any other waits for it."""

    steps = SHARED_RUN_STEPS

    def __init__(self, root: Path):
        self.root = root
        self.data_dir = root / "data"
        root.mkdir(parents=True, exist_ok=True)

    def run_dir(self, stage: int, ranks: int, activation_checkpointing: bool = False, compile: bool = False) -> Path:
        name = f"zero{stage}-ranks{ranks}" + ("-checkpointed" if activation_checkpointing else "") + (
            "-compiled" if compile else "")
        run_dir = self.root / "runs" / name
        with FileLock(self.root / f"{name}.lock"):
            if not (run_dir / "checkpoints" / f"step_{self.steps:08d}" / "complete").exists():
                config = self.config(name, self.root / "runs", stage, activation_checkpointing, compile)
                path = self.root / f"{name}.yaml"
                path.write_text(yaml.safe_dump(config))
                launch(path, ranks=ranks)
        return run_dir

    def config(self, name: str, output_dir: Path, stage: int, activation_checkpointing: bool = False,
               compile: bool = False) -> dict:
        """The tiny config of the shared runs (fp32, validation only at the end), for one variant;
        also for a run started another way that must train what a shared run trains."""
        return merged(TINY_CONFIG, {
            "name": name,
            "output_dir": str(output_dir),
            "data": {"dir": str(self.data_dir)},
            # 24 sequences a step: 6, 3 or 2 micro-batches of 4 on 1, 2 or 3 ranks. A checkpoint halfway, to
            # resume from at another world size.
            "train": {"global_batch_tokens": 24 * 64, "micro_batch_size": 4, "max_steps": self.steps,
                      "checkpoint_every": 100, "checkpoint_steps": [self.steps // 2]},
            "deepspeed": {"zero_stage": stage, "precision": "fp32",
                          "activation_checkpointing": activation_checkpointing, "compile": compile},
            "eval": {"interval": 0, "batches": 1},
        })

    def losses(self, stage: int, ranks: int, **options: bool) -> list[float]:
        """Train losses of steps 1..steps."""
        losses = losses_by_step(self.run_dir(stage, ranks, **options))
        return [losses[step] for step in range(1, self.steps + 1)]


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory) -> SharedRuns:
    # Each xdist worker has a temporary root of its own (popen-gw0, ...); the shared runs live beside them.
    root = tmp_path_factory.getbasetemp()
    return SharedRuns((root.parent if "PYTEST_XDIST_WORKER" in os.environ else root) / "shared-runs")


@pytest.fixture
def in_process(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """Run an entry point's `main(argv)` in this process as `python -m` runs it, through run_command, to test what
    it refuses without paying for a new interpreter: returns its exit code and what it printed."""

    def run(main: Callable[[list[str]], int | None], *argv: str) -> subprocess.CompletedProcess:
        with pytest.raises(SystemExit) as exited:
            run_command(lambda: main(list(argv)))
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), exited.value.code, printed.out, printed.err)

    return run


# Built once for every worker, under a lock: a test using them can run on any worker.
SHARED_ACROSS_WORKERS = {"shared_runs"}


def shared_fixtures(item: pytest.Item) -> list[str]:
    """The project's session- and module-scoped fixtures a test uses that each worker would build anew: things
    built once and then only read."""
    keys = []
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        for definition in definitions:
            if definition.argname in SHARED_ACROSS_WORKERS:
                continue
            if definition.scope in ("session", "module") and definition.func.__module__.startswith("tests"):
                where = "" if definition.scope == "session" else f"{item.module.__name__}::"
                keys.append(where + definition.argname)
    return keys


def xdist_groups(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """Under pytest-xdist, tests that share a built-once fixture (the SLURM cluster, the shared runs, a module's
    trained run) run on one worker, so that it is built once, not once per worker: a group per connected set."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    uses = {item: shared_fixtures(item) for item in items}
    for keys in uses.values():
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    return {item: root(keys[0]) for item, keys in uses.items() if keys}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item, group in xdist_groups(items).items():
        item.add_marker(pytest.mark.xdist_group(group))
    gpu_here = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not gpu_here:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
