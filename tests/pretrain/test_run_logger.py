"""W&B as researchers watch a run: one run across a kill and resume, its config, metric names and alerts."""

from __future__ import annotations

import re
import shlex
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from data_pipeline.common.wandb_runs import WANDB_ID_FILE
from pretrain.config import load_config
from pretrain.run_logger import NAMESPACES, RunLogger
from pretrain.rundir.reader import read_metrics
from tests.helpers import PLANTED_SECRET, TINY_CONFIG, WATCHED_STEPS, of_type, run_module, wandb_records


def test_a_killed_and_resumed_run_is_one_wandb_run_with_strictly_increasing_steps(watched_run):
    assert watched_run.killed_after > 10  # killed after its checkpoint at step 10, with steps to repeat
    assert len(watched_run.records) == 2
    run_id = (watched_run.run_dir / WANDB_ID_FILE).read_text().strip()
    assert run_id.startswith("watched-")
    assert [of_type(records, "run")[0]["run_id"] for records in watched_run.records] == [run_id, run_id]

    steps = [history["step"]["num"] for records in watched_run.records for history in of_type(records, "history")]
    assert all(earlier < later for earlier, later in zip(steps, steps[1:])), steps
    first_attempt = [history["step"]["num"] for history in of_type(watched_run.records[0], "history")]
    assert max(first_attempt) > 10, "the killed attempt should have logged steps past its checkpoint"
    assert steps[0] == 0 and steps[-1] == WATCHED_STEPS
    # The local record holds every step once, the repeated ones as the resumed run computed them.
    assert sorted(record["step"] for record in read_metrics(watched_run.run_dir)) == list(range(WATCHED_STEPS + 1))


def test_the_end_of_an_offline_run_prints_the_sync_command_for_all_its_attempts(watched_run):
    # `wandb sync` and every attempt, oldest first, as a shell would split them.
    attempts = shlex.join(str(path) for path in watched_run.attempts)
    (program,) = re.findall(rf"(\S+) sync {re.escape(attempts)}(?:\s|$)", watched_run.resumed.stdout)
    assert Path(program).name == "wandb"


def test_the_wandb_config_is_the_saved_resolved_config_plus_the_launch(watched_run):
    run = of_type(watched_run.records[-1], "run")[0]
    logged = {key: value for key, value in run["config"]["update"].items() if key != "_wandb"}
    launched = logged.pop("launched")
    assert logged == yaml.safe_load((watched_run.run_dir / "config.yaml").read_text())
    assert launched["backend"] == "local" and launched["world_size"] == 2 and launched["nodes"] == 1
    assert launched["record"].endswith("-local.json") and launched["versions"]["deepspeed"]
    assert run["tags"] == ["tiny", "ci"] and run["job_type"] == "pretrain" and run["run_group"] == "test-sweep"


def test_metrics_are_namespaced_and_plotted_against_tokens(watched_run):
    names = {key for records in watched_run.records for history in of_type(records, "history")
             for key in history["item"] if not key.startswith("_")}
    assert {name.split("/")[0] for name in names} <= set(NAMESPACES)
    assert {"train/loss", "train/lr", "train/tokens", "val/loss", "perf/tokens_per_second",
            "system/cpu_memory_rss_gib", "eval/fewshot/word_labels/k=4"} <= names
    definitions = of_type(watched_run.records[-1], "metric")
    assert {"name": "train/tokens", "options": {"defined": True}} in definitions
    against_tokens = {d["glob_name"] for d in definitions if d.get("step_metric") == "train/tokens"}
    assert against_tokens == {f"{namespace}/*" for namespace in NAMESPACES}
    last = [h["item"] for h in of_type(watched_run.records[-1], "history") if h["step"]["num"] == WATCHED_STEPS][0]
    assert last["train/tokens"] == WATCHED_STEPS * TINY_CONFIG["train"]["global_batch_tokens"]


def test_a_non_finite_loss_and_the_end_of_the_run_raise_alerts(watched_run):
    (non_finite,) = [a for a in of_type(watched_run.records[0], "alert") if a["title"] == "watched: non-finite loss"]
    assert non_finite["level"] == "WARN" and "step 3" in non_finite["text"]  # the step of the NaN drill
    assert [alert["title"] for alert in of_type(watched_run.records[-1], "alert")] == ["watched: finished"]
    (finished,) = of_type(watched_run.records[-1], "alert")
    # It names the last step and the last validation loss.
    last_validation = [record["val/loss"] for record in read_metrics(watched_run.run_dir) if "val/loss" in record][-1]
    assert finished["level"] == "INFO"
    assert f"step {WATCHED_STEPS}" in finished["text"] and f"{last_validation:.4f}" in finished["text"]
    # The count of skipped steps carries across the restart, in W&B and in the local record.
    assert read_metrics(watched_run.run_dir)[-1]["train/skipped_steps"] == 1


def test_a_run_that_stops_making_progress_raises_an_alert(tiny_config):
    config = load_config(tiny_config({"logging": {"wandb_mode": "offline", "stall_alert_minutes": 0.01}}))
    config.run_dir.mkdir(parents=True)
    alerted = threading.Event()
    with pytest.raises(RuntimeError), RunLogger(config, is_main=True, resumed_from_step=None) as logger:
        alert = logger.alert

        def alert_and_tell(title: str, text: str, level: str = "WARN") -> None:
            alert(title, text, level)
            alerted.set()

        logger.alert = alert_and_tell
        logger.log(1, {"train/loss": 2.0, "train/tokens": 2048})
        assert alerted.wait(timeout=30), "no alert after 30 s without a step (the limit is 0.6 s)"
        raise RuntimeError("a rank died")
    (attempt,) = (config.run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(attempt)
    alerts = of_type(records, "alert")
    assert [(alert["title"], alert["level"]) for alert in alerts] == [("tiny: no progress", "WARN"),
                                                                    ("tiny: failed", "ERROR")]
    assert "step 1" in alerts[0]["text"]  # the last step that completed
    assert "step 1" in alerts[1]["text"] and "RuntimeError" in alerts[1]["text"] and "a rank died" in alerts[1]["text"]
    assert [record["exit_code"] for record in of_type(records, "exit")] == [1]


def test_sync_uploads_each_offline_run_once_with_its_attempts_in_order(watched_run, tmp_path):
    result = run_module("pretrain.wandb_sync", str(watched_run.run_dir.parent), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert Path(command[0]).name == "wandb" and command[1] == "sync"
    assert command[2:] == [str(path) for path in watched_run.attempts]

    uploaded = tmp_path / "runs"
    shutil.copytree(watched_run.run_dir / "wandb", uploaded / "watched" / "wandb")
    for attempt in (uploaded / "watched" / "wandb").glob("offline-run-*"):
        (attempt / f"run-{attempt.name.split('-', 3)[3]}.wandb.synced").touch()  # as `wandb sync` marks them
    result = run_module("pretrain.wandb_sync", str(uploaded), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0 and not any(attempt.name in result.stdout for attempt in watched_run.attempts)

    result = run_module("pretrain.wandb_sync", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'nowhere'}: ")


def test_a_secret_exported_for_the_run_is_in_none_of_its_files(watched_run):
    holding = [path for path in watched_run.run_dir.rglob("*")
               if path.is_file() and PLANTED_SECRET.encode() in path.read_bytes()]
    assert holding == []
