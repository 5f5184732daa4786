"""The SLURM backend against a real SLURM controller and node daemon on this machine."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pretrain.metrics import read_metrics
from tests.launch.slurm_cluster import SlurmCluster

REPOSITORY = Path(__file__).resolve().parents[2]
# Shell metacharacters that would run commands if a value reached the sbatch script unquoted.
HOSTILE = "it's $(touch executed) `touch executed` ; touch executed \" | & > out"


def submit(cluster: SlurmCluster, config: str, *overrides: str, cwd: Path) -> tuple[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "launch", "run", "--backend", "slurm", "--config", config, *overrides],
        cwd=cwd, env={**cluster.environment, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"submitted job (\d+)", result.stdout).group(1), result.stdout


def test_the_quickstart_submitted_to_slurm_trains_and_hostile_values_arrive_verbatim(cluster, tmp_path):
    hostile = HOSTILE
    job_id, printed = submit(
        cluster, str(REPOSITORY / "configs" / "quickstart.yaml"),
        f"output_dir={tmp_path / 'runs'}", f"data.dir={tmp_path / 'data'}", "train.max_steps=30",
        "train.checkpoint_every=15", "eval.interval=15", "logging.wandb_mode=disabled",
        f"logging.wandb_project={hostile}", f"launch.environment.RUN_NOTE={hostile}",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "quickstart"
    log = run_dir / "slurm" / f"{job_id}.out"
    assert f"log {log}" in printed and f"script {run_dir / 'slurm' / f'job-{job_id}.sbatch'}" in printed

    state = cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    assert state == "COMPLETED", log.read_text()
    assert (run_dir / "checkpoints" / "step_00000030" / "complete").exists()
    assert sorted(r["step"] for r in read_metrics(run_dir) if "train/loss" in r) == list(range(1, 31))
    assert "validation loss:" in log.read_text()

    assert not (tmp_path / "executed").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logging"]["wandb_project"] == hostile
    (node_record,) = (run_dir / "launches").glob("*-node.json")
    assert json.loads(node_record.read_text())["environment"]["RUN_NOTE"] == hostile


def test_a_requeued_job_resumes_from_its_checkpoint(cluster, tiny_config, tmp_path):
    config = tiny_config({"train": {"max_steps": 200, "checkpoint_every": 10}, "logging": {"print_every": 10}})
    job_id, _ = submit(cluster, str(config), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_00000010" / "complete").exists():
        assert time.monotonic() < deadline and cluster.job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)

    cluster.scontrol("requeue", job_id)
    state = cluster.wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=900)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert state == "COMPLETED", log
    assert "restart 1" in log
    # SLURM's SIGTERM made the ranks save where they were; the requeued job went on from there.
    resumed_step = int(re.search(r"resumed from step_\d+ \(step (\d+)\)", log).group(1))
    marker = json.loads((run_dir / "checkpoints" / f"step_{resumed_step:08d}" / "complete").read_text())
    assert resumed_step >= 10 and marker["preempted_by"] == "SIGTERM"
    assert (run_dir / "checkpoints" / "step_00000200" / "complete").exists()
    assert sorted(r["step"] for r in read_metrics(run_dir) if "train/loss" in r) == list(range(1, 201))
