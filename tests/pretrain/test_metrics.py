"""W&B as researchers watch a run: one run across a kill and resume, its config, metric names and alerts."""

from __future__ import annotations

import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import yaml

from pretrain.config import load_config
from pretrain.metrics import NAMESPACES, WANDB_ID_FILE, RunLogger, read_metrics
from tests.helpers import TINY_CONFIG, deep_merge, launch, signal_job, start_launch, wait_for, wandb_records

MAX_STEPS = 100


def write_config(directory: Path, changes: dict) -> Path:
    config = deep_merge(TINY_CONFIG, changes)
    config.update(output_dir=str(directory / "runs"))
    config["data"]["dir"] = str(directory / "data")
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def highest_step(run_dir: Path) -> int:
    return max((record["step"] for record in read_metrics(run_dir)), default=-1)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A 2-rank run with offline W&B and a NaN-loss drill at step 3, killed (SIGKILL to every process, as when
    a node dies) a few steps after its step-10 checkpoint, then run again to the end, resuming."""
    root = tmp_path_factory.mktemp("watched")
    config = write_config(root, {
        "name": "watched",
        "train": {"max_steps": MAX_STEPS, "checkpoint_every": 10},
        "eval": {"interval": 10},
        "faults": {"nan_loss_at_steps": [3]},
        "logging": {"wandb_mode": "offline", "wandb_tags": ["tiny", "ci"], "wandb_job_type": "pretrain",
                    "wandb_group": "test-sweep", "print_every": 5},
    })
    run_dir = root / "runs" / "watched"
    job = start_launch(config)
    wait_for(run_dir / "checkpoints" / "step_00000010" / "complete", job)
    (attempt,) = (run_dir / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 120
    # Until W&B's offline record holds steps past the checkpoint, which the resumed run will repeat.
    while max((h["step"]["num"] for h in of_type(wandb_records(attempt), "history")), default=0) <= 11:
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.1)
    signal_job(job, signal.SIGKILL)
    job.wait()
    killed_after = highest_step(run_dir)
    assert killed_after < MAX_STEPS, "the run finished before the kill"
    resumed = launch(config)
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    return run_dir, killed_after, resumed, [wandb_records(attempt) for attempt in attempts], attempts


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [record[kind] for record in records if record["type"] == kind]


def test_a_killed_and_resumed_run_is_one_wandb_run_with_strictly_increasing_steps(interrupted_run):
    run_dir, killed_after, resumed, attempts, _paths = interrupted_run
    resumed_at = int(re.search(r"resumed from step_\d+ \(step (\d+)\)", resumed.stdout).group(1))
    assert 10 <= resumed_at <= killed_after
    assert len(attempts) == 2
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert run_id.startswith("watched-")
    assert [of_type(records, "run")[0]["run_id"] for records in attempts] == [run_id, run_id]

    steps = [history["step"]["num"] for records in attempts for history in of_type(records, "history")]
    assert all(earlier < later for earlier, later in zip(steps, steps[1:])), steps
    first_attempt = [history["step"]["num"] for history in of_type(attempts[0], "history")]
    assert max(first_attempt) > 10, "the killed attempt should have logged steps past its checkpoint"
    assert steps[0] == 0 and steps[-1] == MAX_STEPS
    # The local record holds every step once, the repeated ones as the resumed run computed them.
    assert sorted(record["step"] for record in read_metrics(run_dir)) == list(range(MAX_STEPS + 1))


def test_the_end_of_an_offline_run_prints_the_sync_command_for_all_its_attempts(interrupted_run):
    _run_dir, _killed, resumed, _attempts, paths = interrupted_run
    (line,) = [line for line in resumed.stdout.splitlines() if line.startswith("W&B ran offline")]
    command = shlex.split(line.split("upload this run with: ")[1].split(" (or `make sync`")[0])
    assert Path(command[0]).name == "wandb" and command[1] == "sync"
    assert command[2:] == [str(path) for path in paths]


def test_the_wandb_config_is_the_saved_resolved_config_plus_the_launch(interrupted_run):
    run_dir, _killed, _resumed, attempts, _paths = interrupted_run
    run = of_type(attempts[-1], "run")[0]
    logged = {key: value for key, value in run["config"]["update"].items() if key != "_wandb"}
    launch_details = logged.pop("launched")
    assert logged == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert launch_details["backend"] == "local" and launch_details["world_size"] == 2
    assert launch_details["nodes"] == 1 and launch_details["versions"]["deepspeed"]
    assert launch_details["record"].endswith("-local.json")
    assert run["tags"] == ["tiny", "ci"] and run["job_type"] == "pretrain" and run["run_group"] == "test-sweep"


def test_metrics_are_namespaced_and_plotted_against_tokens(interrupted_run):
    _run_dir, _killed, _resumed, attempts, _paths = interrupted_run
    names = {key for records in attempts for history in of_type(records, "history") for key in history["item"]
             if not key.startswith("_")}
    assert {name.split("/")[0] for name in names} <= set(NAMESPACES)
    assert {"train/loss", "train/lr", "train/tokens", "val/loss", "perf/tokens_per_second",
            "system/cpu_memory_rss_gib"} <= names
    definitions = of_type(attempts[-1], "metric")
    assert {"name": "train/tokens", "options": {"defined": True}} in definitions
    against_tokens = {d["glob_name"] for d in definitions if d.get("step_metric") == "train/tokens"}
    assert against_tokens == {f"{namespace}/*" for namespace in NAMESPACES}
    last = [h["item"] for h in of_type(attempts[-1], "history") if h["step"]["num"] == MAX_STEPS][0]
    assert last["train/tokens"] == MAX_STEPS * TINY_CONFIG["train"]["global_batch_tokens"]


def test_a_non_finite_loss_and_the_end_of_the_run_raise_alerts(interrupted_run):
    _run_dir, _killed, resumed, attempts, _paths = interrupted_run
    (non_finite,) = [alert for alert in of_type(attempts[0], "alert") if "non-finite loss" in alert["title"]]
    assert non_finite["level"] == "WARN" and non_finite["text"].startswith("step 3: loss nan")
    assert [alert["title"] for alert in of_type(attempts[-1], "alert")] == ["watched: finished"]
    assert f"info: finished: reached step {MAX_STEPS}, val/loss" in resumed.stdout


def test_a_run_that_stops_making_progress_raises_an_alert(tiny_config, tmp_path, capsys):
    config = load_config(tiny_config({"logging": {"wandb_mode": "offline", "stall_alert_minutes": 0.01}}))
    config.run_dir.mkdir(parents=True)
    with pytest.raises(RuntimeError), RunLogger(config, is_main=True, resumed_from_step=None) as logger:
        logger.log(1, {"train/loss": 2.0, "train/tokens": 2048})
        time.sleep(2.5)  # over 0.6 s without a step
        raise RuntimeError("a rank died")
    (attempt,) = (config.run_dir / "wandb").glob("offline-run-*")
    alerts = of_type(wandb_records(attempt), "alert")
    assert [(alert["title"], alert["level"]) for alert in alerts] == [("tiny: no progress", "WARN"),
                                                                    ("tiny: failed", "ERROR")]
    assert "after step 1" in alerts[0]["text"] and "RuntimeError after step 1: a rank died" == alerts[1]["text"]
    assert "warn: no progress: no step has completed for" in capsys.readouterr().err
    assert [record["exit_code"] for record in of_type(wandb_records(attempt), "exit")] == [1]
