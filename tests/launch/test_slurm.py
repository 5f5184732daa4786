"""The SLURM backend against a real SLURM controller and node daemon on this machine.

One job serves every test here: the quickstart, submitted as a user submits it with hostile values in a setting
and an environment variable, is preempted after its first checkpoint (SLURM requeues it, sending SIGTERM) and
runs to the end when SLURM starts it again, without hashing the corpus again."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from data_pipeline.prepare import prepare
from data_pipeline.verification import VERIFIED_RECORD, file_stamp
from pretrain.checkpoint_store import read_marker
from pretrain.rundir.reader import read_metrics
from tests.helpers import mixed_config, mixed_sources, same_files
from tests.launch.slurm_cluster import SlurmCluster

REPOSITORY = Path(__file__).resolve().parents[2]
# Shell metacharacters that would run commands if a value reached the sbatch script unquoted.
HOSTILE = "it's $(touch executed) `touch executed` ; touch executed \" | & > out"
STEPS = 10
FIRST_CHECKPOINT = 2
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


@dataclass
class PreemptedJob:
    job_id: str
    workdir: Path  # where it was submitted from
    run_dir: Path
    state: str  # once it ended
    restarts: int  # as SLURM counts them


def submit(cluster: SlurmCluster, config: Path, *overrides: str, cwd: Path, run_dir: Path) -> str:
    """Submit a run as a user does; returns the job id, read from the name of the script the launcher kept."""
    result = subprocess.run(
        [sys.executable, "-m", "launch", "run", "--backend", "slurm", "--config", str(config), *overrides],
        cwd=cwd, env={**cluster.environment, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (script,) = (run_dir / "slurm").glob("job-*.sbatch")
    return script.stem.removeprefix("job-")


@pytest.fixture(scope="module")
def preempted_job(cluster, tmp_path_factory) -> PreemptedJob:
    workdir = tmp_path_factory.mktemp("slurm-job")
    run_dir = workdir / "runs" / "quickstart"
    # The quickstart's model and schedule; its corpus cut to a small in-context source, whose preparation takes a
    # second rather than minutes; no few-shot evaluation in the loop.
    job_id = submit(
        cluster, REPOSITORY / "configs" / "quickstart.yaml",
        f"output_dir={workdir / 'runs'}", f"data.dir={workdir / 'data'}",
        "data.sources=[{kind: icl_episodes, episodes: 2000}]", "data.val_fraction=0.1", "eval.fewshot.interval=0",
        f"train.max_steps={STEPS}", f"train.checkpoint_every={FIRST_CHECKPOINT}", "eval.interval=5",
        "logging.wandb_mode=disabled", f"logging.wandb_project={HOSTILE}", f"launch.environment.RUN_NOTE={HOSTILE}",
        cwd=workdir, run_dir=run_dir,
    )
    first_checkpoint = run_dir / "checkpoints" / f"step_{FIRST_CHECKPOINT:08d}" / "complete"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert time.monotonic() < deadline and cluster.job_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING"), (
            cluster.logs())
        time.sleep(0.25)
    # A shard changed in place, and the verification record the first start left brought up to date with the
    # shard's new stamp, as if these bytes had been checked: the requeued job trains only if it trusts the record
    # instead of hashing the corpus again. (The bytes changed are in the tar archive's closing padding, which no
    # reader looks at.)
    shard = next((workdir / "data").glob("train-*.tar"))
    content = bytearray(shard.read_bytes())
    content[-1] ^= 1
    shard.write_bytes(bytes(content))
    record = workdir / "data" / VERIFIED_RECORD
    verified = json.loads(record.read_text())
    assert str(shard) in verified["shards"]
    verified["shards"][str(shard)] = file_stamp(str(shard))
    record.write_text(json.dumps(verified))
    # SLURM's requeue reaches the ranks as SIGTERM within a step or two, long before the last step.
    cluster.scontrol("requeue", job_id)
    state = cluster.wait_for_state(job_id, ENDED, timeout=900)
    return PreemptedJob(job_id, workdir, run_dir, state, int(cluster.job_field(job_id, "Restarts")))


def test_the_quickstart_submitted_to_slurm_trains_and_hostile_values_arrive_verbatim(preempted_job):
    run_dir = preempted_job.run_dir
    log = run_dir / "slurm" / f"{preempted_job.job_id}.out"  # where the launcher said the job logs
    assert log.exists() and preempted_job.state == "COMPLETED", log.read_text()
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "complete").exists()
    assert sorted(r["step"] for r in read_metrics(run_dir) if "train/loss" in r) == list(range(1, STEPS + 1))
    assert [r["step"] for r in read_metrics(run_dir) if "val/loss" in r] == [0, 5, STEPS]

    assert not (preempted_job.workdir / "executed").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["logging"]["wandb_project"] == HOSTILE
    node_records = [json.loads(path.read_text()) for path in sorted((run_dir / "launches").glob("*-node.json"))]
    assert [record["environment"]["RUN_NOTE"] for record in node_records] == [HOSTILE, HOSTILE]


def test_a_requeued_job_resumes_from_its_checkpoint_without_hashing_the_corpus_again(preempted_job):
    run_dir = preempted_job.run_dir
    assert preempted_job.state == "COMPLETED"
    assert preempted_job.restarts == 1
    node_records = [json.loads(path.read_text()) for path in sorted((run_dir / "launches").glob("*-node.json"))]
    assert [record["environment"].get("SLURM_RESTART_COUNT", "0") for record in node_records] == ["0", "1"]
    # SLURM's SIGTERM made the ranks save where they were; the requeued job went on from there.
    markers = [read_marker(path.parent) for path in (run_dir / "checkpoints").glob("step_*/complete")]
    (preempted,) = [marker for marker in markers if "preempted_by" in marker]
    assert FIRST_CHECKPOINT <= preempted["step"] < STEPS and preempted["preempted_by"] == "SIGTERM"
    # Every step once: a job that started over instead of resuming would have logged the first steps twice.
    assert sorted(r["step"] for r in read_metrics(run_dir) if "train/loss" in r) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "complete").exists()


def test_a_preparation_on_slurm_by_a_job_array_gives_the_bytes_of_one_by_a_single_process(cluster, tmp_path):
    sources = mixed_sources(tmp_path / "corpus")
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 512},
                                      "data": mixed_config(tmp_path / "data", sources, 1).model_dump(mode="json")}))
    result = subprocess.run(
        [sys.executable, "-m", "launch", "prepare", "--config", str(config), "--backend", "slurm", "--tasks", "2"],
        cwd=tmp_path, env=cluster.environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    array_job, manifest_job = sorted(int(path.stem.removeprefix("job-")) for path in
                                      (tmp_path / ".data.slurm").glob("job-*.sbatch"))
    state = cluster.wait_for_state(str(manifest_job), ENDED, timeout=300)
    task_logs = sorted((tmp_path / ".data.slurm").glob(f"{array_job}_*.out"))
    assert state == "COMPLETED", cluster.logs() + "".join(path.read_text() for path in task_logs)
    assert [path.name for path in task_logs] == [f"{array_job}_0.out", f"{array_job}_1.out"]
    single = prepare(mixed_config(tmp_path / "single", sources, workers=1), vocab_size=512, log=lambda *_: None)
    assert same_files(tmp_path / "data", single.dir)
