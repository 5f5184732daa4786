"""Scaling sweeps: a spec expanded into named runs, run through the launcher, skipped once finished."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.sweep import expand, non_embedding_parameters
from pretrain.config import ConfigError, load_config, load_sweep
from pretrain.metrics import read_metrics
from tests.helpers import run_module, signal_job, wait_for


def write_sweep(directory: Path, base: Path, **changes) -> Path:
    spec = {
        "name": "ladder",
        "base": str(base),
        "overrides": ["eval.interval=0", "train.checkpoint_every=1000000"],
        "sizes": [{"n_layer": 1, "d_model": 32, "n_head": 2}, {"n_layer": 2, "d_model": 64, "n_head": 4, "lr": 1e-3}],
        "tokens_per_parameter": [0.5],
        "seeds": [0],
        "output_dir": str(directory / "runs"),
        **changes,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def statuses(output: str) -> dict[str, str]:
    """Each run's line of a sweep's output: `[i/n] NAME: N=..., D=...: STATUS` -> {NAME: STATUS}."""
    return {match["name"]: match["status"]
            for match in re.finditer(r"^\[\d+/\d+\] (?P<name>\S+): N=[\d,]+, D=[\d,]+: (?P<status>.*)$", output, re.M)}


def test_a_spec_expands_into_stably_named_runs_of_each_size_budget_and_seed(tiny_config, tmp_path):
    spec = load_sweep(write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[1, 2], seeds=[0, 7], lr=2e-3))
    runs = expand(spec)
    assert [run.name for run in runs] == [
        f"ladder-l{l}-d{d}-tpp{t}-s{s}" for l, d in ((1, 32), (2, 64)) for t in (1, 2) for s in (0, 7)]
    assert runs == expand(spec)  # the same spec, the same runs
    for run in runs:
        config = load_config(spec.base, run.overrides)
        assert config.name == run.name and config.run_dir == tmp_path / "runs" / "ladder" / run.name
        assert run.parameters == non_embedding_parameters(config)
        multiple = float(run.name.split("-tpp")[1].split("-")[0])
        assert config.train.max_steps == math.ceil(multiple * run.parameters / config.train.global_batch_tokens)
        assert run.tokens == config.train.max_steps * config.train.global_batch_tokens
        assert config.train.lr == (2e-3 if config.model.d_model == 32 else 1e-3)  # the size's own lr wins
        assert config.logging.wandb_group == "ladder" and f"n={run.parameters}" in config.logging.wandb_tags


def test_a_bad_spec_is_refused_naming_the_field(tiny_config, tmp_path):
    spec = write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[])
    result = run_module("launch", "sweep", "--spec", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"config error: {spec}: tokens_per_parameter: List should have at least 1 item"
                                     " after validation, not 0")
    twice = write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[20, 20.0])
    result = run_module("launch", "sweep", "--spec", str(twice), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("config error: ladder: two runs would share a name; make the sizes, budgets"
                                     " and seeds distinct")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="sweep spec file not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_an_interrupted_sweep_run_again_skips_the_finished_run_and_resumes_the_other(tiny_config, tmp_path):
    base = tiny_config({"train": {"max_steps": 8}})
    spec = write_sweep(tmp_path, base, tokens_per_parameter=[2])
    second = tmp_path / "runs" / "ladder" / "ladder-l2-d64-tpp2-s0"
    job = subprocess.Popen([sys.executable, "-m", "launch", "sweep", "--spec", str(spec)], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(second / "metrics.jsonl", job)
    while not any(record["step"] >= 3 for record in read_metrics(second)):
        assert job.poll() is None, job.communicate()[0]
        time.sleep(0.05)
    signal_job(job, signal.SIGTERM)  # as SLURM or Ctrl-C would stop it
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 75, output
    assert statuses(output) == {"ladder-l1-d32-tpp2-s0": "starting", "ladder-l2-d64-tpp2-s0":
                                "interrupted; run the sweep again to resume it and go on"}

    again = run_module("launch", "sweep", "--spec", str(spec), cwd=tmp_path)
    assert statuses(again.stdout) == {"ladder-l1-d32-tpp2-s0": "finished, skipped",
                                      "ladder-l2-d64-tpp2-s0": "resuming"}
    # Two runs are too few to fit a law: the sweep says so after training them.
    assert again.returncode == 1 and "needs at least 5 runs" in again.stderr
    steps = sorted(record["step"] for record in read_metrics(second) if "train/loss" in record)
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == load_config(
        load_sweep(spec).base, expand(load_sweep(spec))[1].overrides).train.max_steps
