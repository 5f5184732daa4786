"""Scaling sweeps: a spec expanded into named runs, run through the launcher, skipped once finished."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_pipeline.common.errors import ConfigError
from launch.__main__ import main as launch_main
from launch.sweep import expand, side_by_side_environments
from launch.sweep_spec import load_sweep
from pretrain.config import Config, load_config
from pretrain.rundir.points import non_embedding_parameters
from pretrain.rundir.reader import finished_with, read_metrics
from tests.helpers import launch, losses_by_step, run_module, signal_job, wait_for_step, wandb_records


def write_sweep(directory: Path, base: Path, **changes) -> Path:
    spec = {
        "name": "ladder",
        "base": str(base),
        "overrides": ["eval.interval=0", "train.checkpoint_every=1000000"],
        "sizes": [{"n_layer": 1, "d_model": 32, "n_head": 2}, {"n_layer": 2, "d_model": 64, "n_head": 4, "lr": 1e-3}],
        "tokens_per_parameter": [0.5],
        "seeds": [0],
        "bootstrap": 20,  # intervals of fewer resamplings: the fits' own tests check their numbers
        "output_dir": str(directory / "runs"),
        **changes,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def statuses(output: str) -> dict[str, list[str]]:
    """Each run's lines of a sweep's output, `[i/n] NAME: N=..., D=...: STATUS` and then what to do after a colon,
    semicolon or parenthesis -> {NAME: [STATUS, ...]}: the status alone (`finished, skipped`, `interrupted`)."""
    found = {}
    for match in re.finditer(r"^\[\d+/\d+\] (?P<name>\S+): N=[\d,]+, D=[\d,]+: (?P<status>[^:;(\n]+?)(?: ?[:;(].*)?$",
                             output, re.M):
        found.setdefault(match["name"], []).append(match["status"])
    return found


def status_line(output: str, name: str) -> str:
    (line,) = [line for line in output.splitlines() if re.match(rf"^\[\d+/\d+\] {re.escape(name)}: ", line)]
    return line


def test_a_spec_expands_into_stably_named_runs_of_each_size_budget_and_seed(tiny_config, tmp_path):
    spec = load_sweep(write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[1, 2], seeds=[0, 7], lr=2e-3))
    runs = expand(spec)
    assert [run.name for run in runs] == [
        f"ladder-l{layers}-d{d}-tpp{t}-s{s}" for layers, d in ((1, 32), (2, 64)) for s in (0, 7) for t in (1, 2)]
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


def test_compute_budgets_give_each_size_the_tokens_of_its_isoflop_budget(tiny_config, tmp_path):
    spec = load_sweep(write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[], compute_budgets=[1e9, 2.5e10]))
    runs = expand(spec)
    assert [run.name for run in runs] == [
        f"ladder-l{layers}-d{d}-c{c}-s0" for layers, d in ((1, 32), (2, 64)) for c in ("1e9", "2.5e10")]
    for run, flops in zip(runs, [1e9, 2.5e10] * 2):
        steps = math.ceil(flops / (6 * run.parameters) / run.config.train.global_batch_tokens)
        assert run.config.train.max_steps == steps and f"C={flops:.3g}" in run.config.logging.wandb_tags
        step_flops = 6 * run.parameters * run.config.train.global_batch_tokens
        assert flops <= 6 * run.parameters * run.tokens < flops + step_flops  # rounded up to whole steps


def test_runs_side_by_side_share_the_cores_or_each_get_their_own_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("launch.sweep.gpus_here", lambda: 0)  # this machine's answer, whatever the machine
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert side_by_side_environments(4, ranks=2) == [{"OMP_NUM_THREADS": "2"}] * 4
    # On an 8-GPU node, each of 4 runs sees 2 GPUs of its own (a run takes every GPU it sees).
    monkeypatch.setattr("launch.sweep.gpus_here", lambda: 8)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in side_by_side_environments(4, None)] == ["0,1", "2,3", "4,5", "6,7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    monkeypatch.setattr("launch.sweep.gpus_here", lambda: 3)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in side_by_side_environments(3, None)] == ["4", "5", "6"]
    with pytest.raises(ConfigError, match=r"^--parallel: ") as refused:
        side_by_side_environments(4, None)
    assert {"4", "3"} <= set(re.findall(r"\d+", str(refused.value)))  # the runs asked for, the GPUs there are


def test_a_bad_spec_is_refused_naming_the_field(tiny_config, tmp_path, in_process, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[])
    result = in_process(launch_main, "sweep", "--spec", str(spec))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"config error: {spec}: ")
    assert "tokens_per_parameter" in result.stderr and "compute_budgets" in result.stderr
    twice = write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[20, 20.0])
    result = in_process(launch_main, "sweep", "--spec", str(twice))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("config error: ladder: ")  # the sweep, by its name
    for option in ("--nodes", "--parallel"):
        result = in_process(launch_main, "sweep", "--spec", str(twice), "--backend", "slurm", option, "0")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"config error: {option}: ")
    cosine = write_sweep(tmp_path, tiny_config({"train": {"schedule": "cosine"}}), decay_branches=True)
    result = in_process(launch_main, "sweep", "--spec", str(cosine))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("config error: ladder: ")
    assert "decay_branches" in result.stderr and "train.schedule" in result.stderr and "'cosine'" in result.stderr
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "missing.yaml"))):
        load_sweep(tmp_path / "missing.yaml")


def test_an_interrupted_sweep_run_again_skips_the_finished_run_and_resumes_the_other(tiny_config, tmp_path):
    base = tiny_config({"train": {"max_steps": 8}})
    spec = write_sweep(tmp_path, base, tokens_per_parameter=[2])
    second = tmp_path / "runs" / "ladder" / "ladder-l2-d64-tpp2-s0"
    # One rank a run: what is tested is the sweep's bookkeeping, which the number of ranks does not change.
    job = subprocess.Popen([sys.executable, "-m", "launch", "sweep", "--spec", str(spec), "--ranks", "1"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(second, 3, job)
    signal_job(job, signal.SIGTERM)  # as SLURM or Ctrl-C would stop it
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 75, output
    assert statuses(output) == {"ladder-l1-d32-tpp2-s0": ["starting", "finished"],
                                "ladder-l2-d64-tpp2-s0": ["starting", "interrupted"]}

    again = run_module("launch", "sweep", "--spec", str(spec), "--ranks", "1", cwd=tmp_path)
    assert statuses(again.stdout) == {"ladder-l1-d32-tpp2-s0": ["finished, skipped"],
                                      "ladder-l2-d64-tpp2-s0": ["resuming", "finished"]}
    # Two runs are too few to fit a law: the sweep says so, naming how many it has, after training them.
    assert again.returncode == 2 and re.search(r"\b2 runs\b", again.stderr), again.stderr
    steps = sorted(record["step"] for record in read_metrics(second) if "train/loss" in record)
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == load_config(
        load_sweep(spec).base, expand(load_sweep(spec))[1].overrides).train.max_steps


def test_decay_branches_trained_side_by_side_match_runs_trained_separately(tiny_config, tmp_path):
    base = tiny_config({"train": {"schedule": "wsd", "decay_fraction": 0.5, "warmup_steps": 1, "keep_checkpoints": 1},
                        "eval": {"interval": 2}})
    # Each size's 0.5-token budget leaves its 1.1-token trunk at the start of its own decay.
    spec = write_sweep(tmp_path, base, sizes=[{"n_layer": 1, "d_model": 32, "n_head": 2},
                                              {"n_layer": 1, "d_model": 48, "n_head": 2}],
                       tokens_per_parameter=[1.1, 0.5], decay_branches=True)
    runs = {run.name: run for run in expand(load_sweep(spec))}
    branch = runs["ladder-l1-d32-tpp0.5-s0"]
    branch_point = branch.config.train.max_steps // 2
    assert branch.trunk == "ladder-l1-d32-tpp1.1-s0" and branch.config.train.branch_from.endswith(
        f"ladder-l1-d32-tpp1.1-s0/checkpoints/step_{branch_point:08d}")
    assert runs[branch.trunk].config.train.checkpoint_steps == [branch_point]

    # One rank a run, two runs side by side: a core each.
    result = run_module("launch", "sweep", "--spec", str(spec), "--parallel", "2", "--ranks", "1", cwd=tmp_path)
    # It says how many steps the branches save: each branch trains only its steps after its branch point.
    separately = sum(run.config.train.max_steps for run in runs.values())
    branched = sum(run.config.train.max_steps - run.branch_step for run in runs.values())
    assert branched < separately
    assert any(f"{branched:,}" in line and f"{separately:,}" in line for line in result.stdout.splitlines())
    # Both trunks train side by side: each has started before any run finishes.
    said = re.findall(r"^\[\d+/\d+\] (\S+): N=[\d,]+, D=[\d,]+: (starting|finished)\b", result.stdout, re.M)
    started = [i for i, (name, status) in enumerate(said) if status == "starting" and "tpp1.1" in name]
    assert len(started) == 2 and max(started) < min(i for i, (_, status) in enumerate(said) if status == "finished")
    assert {name: said[-1] for name, said in statuses(result.stdout).items()} == dict.fromkeys(runs, "finished")
    assert Path(branch.config.train.branch_from, "complete").exists()  # spared by keep_checkpoints=1
    assert branch.config.train.branch_from in (branch.config.run_dir / "sweep.log").read_text()

    # The branch is the run that a separate WSD run of its budget would have been.
    separate = [override for override in branch.overrides if not override.startswith("train.branch_from=")]
    launch(base, *separate, "name=separate", f"output_dir={tmp_path / 'separate'}", ranks=1)
    branched, alone = losses_by_step(branch.config.run_dir), losses_by_step(tmp_path / "separate" / "separate")
    assert sorted(branched) == list(range(branch_point + 1, branch.config.train.max_steps + 1))
    assert [branched[step] for step in sorted(branched)] == pytest.approx([alone[step] for step in sorted(branched)],
                                                                         rel=1e-4)
    validation = [[r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r][-1]
                  for run_dir in (branch.config.run_dir, tmp_path / "separate" / "separate")]
    assert validation[0] == pytest.approx(validation[1], rel=1e-4)


def test_a_branch_whose_finished_trunk_lacks_its_branch_point_is_not_started_and_says_what_to_do(tiny_config,
                                                                                                  tmp_path):
    base = tiny_config({"train": {"schedule": "wsd"}})
    spec = write_sweep(tmp_path, base, sizes=[{"n_layer": 1, "d_model": 32, "n_head": 2}],
                       tokens_per_parameter=[1.1, 0.5], decay_branches=True)
    trunk, branch = expand(load_sweep(spec))
    # The trunk finished under an earlier spec that had no smaller budget: only its final checkpoint exists.
    fake_finished(trunk.config)
    result = run_module("launch", "sweep", "--spec", str(spec), cwd=tmp_path)
    assert result.returncode == 1
    assert statuses(result.stdout) == {trunk.name: ["finished, skipped"], branch.name: ["not started"]}
    # It names the trunk, the checkpoint it lacks and the run directory to remove to train the trunk again.
    said = status_line(result.stdout, branch.name)
    assert trunk.name in said and branch.config.train.branch_from in said and str(trunk.config.run_dir) in said
    assert not branch.config.run_dir.exists()


def fake_finished(config: Config) -> None:
    """What a run that reached its last step leaves that the sweep reads: its saved config and final marker."""
    final = config.run_dir / "checkpoints" / f"step_{config.train.max_steps:08d}"
    final.mkdir(parents=True)
    (final / "complete").write_text(json.dumps({"step": config.train.max_steps, "world_size": 2}))
    (config.run_dir / "config.yaml").write_text(config.to_yaml())


def test_a_run_finished_with_other_settings_is_named_stale_and_nothing_starts(tiny_config, tmp_path, in_process,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[0.5])
    same, changed = expand(load_sweep(spec))
    fake_finished(same.config)
    fake_finished(changed.config.model_copy(update={"train": changed.config.train.model_copy(update={"lr": 0.5})}))
    result = in_process(launch_main, "sweep", "--spec", str(spec))
    assert result.returncode == 1
    said = statuses(result.stdout)
    assert said[same.name] == ["finished, skipped"]
    assert said[changed.name] == ["stale"]
    stale = status_line(result.stdout, changed.name)
    assert "train.lr" in stale and str(changed.config.run_dir) in stale  # the setting that changed, what to remove
    assert finished_with(changed.config) == ["train.lr: 0.5 -> 0.001"]
    assert not (changed.config.run_dir / "metrics.jsonl").exists()


def test_a_sweep_on_slurm_is_one_job_array_and_running_it_again_skips_what_finished(cluster, tiny_config, tmp_path):
    spec = write_sweep(tmp_path, tiny_config(), tokens_per_parameter=[0.5])
    command = [sys.executable, "-m", "launch", "sweep", "--spec", str(spec), "--backend", "slurm"]
    environment = {**cluster.environment, "WANDB_SILENT": "true"}
    submitted = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    slurm_dir = tmp_path / "runs" / "ladder" / "slurm"
    (script,) = slurm_dir.glob("job-*.sbatch")  # one job array, its script kept as job-<id>.sbatch
    job_id = script.name.removeprefix("job-").removesuffix(".sbatch")
    assert "#SBATCH --array=0-1" in script.read_text().splitlines()

    for index, run in enumerate(expand(load_sweep(spec))):
        state = cluster.wait_for_state(f"{job_id}_{index}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
        log = run.config.run_dir / "slurm" / f"{job_id}_{index}.out"
        assert state == "COMPLETED", log.read_text()
        assert cluster.job_field(f"{job_id}_{index}", "ArrayJobId") == job_id
        assert cluster.job_field(f"{job_id}_{index}", "ArrayTaskId") == str(index)
        records = read_metrics(run.config.run_dir)
        steps = sorted(record["step"] for record in records if "train/loss" in record)
        assert steps == list(range(1, run.config.train.max_steps + 1))
        assert any(record["step"] == run.config.train.max_steps and "val/loss" in record for record in records)

    again = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert list(statuses(again.stdout).values()) == [["finished, skipped"]] * 2
    assert list(slurm_dir.glob("job-*.sbatch")) == [script]  # nothing submitted again
    # Nothing left to run: it fits them, and two runs are too few for a law.
    assert again.returncode == 2 and re.search(r"\b2 runs\b", again.stderr), again.stderr


def test_decay_branches_on_slurm_wait_for_their_trunks_task_and_a_rerun_meanwhile_is_refused(cluster, tiny_config,
                                                                                             tmp_path):
    base = tiny_config({"train": {"schedule": "wsd", "decay_fraction": 0.5}})
    spec = write_sweep(tmp_path, base, sizes=[{"n_layer": 1, "d_model": 32, "n_head": 2}],
                       tokens_per_parameter=[1.1, 0.5], decay_branches=True)
    trunk, branch = expand(load_sweep(spec))
    command = [sys.executable, "-m", "launch", "sweep", "--spec", str(spec), "--backend", "slurm"]
    environment = {**cluster.environment, "WANDB_SILENT": "true"}
    submitted = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # Two job arrays, each script kept as job-<id>.sbatch: the branch's starts only once the trunk's task succeeded.
    slurm_dir = tmp_path / "runs" / "ladder" / "slurm"
    scripts = {path.name.removeprefix("job-").removesuffix(".sbatch"): path.read_text().splitlines()
               for path in slurm_dir.glob("job-*.sbatch")}
    (branch_job,) = [job for job, lines in scripts.items() if any(line.startswith("#SBATCH --dependency=")
                                                                   for line in lines)]
    (trunk_job,) = set(scripts) - {branch_job}
    assert f"#SBATCH --dependency=afterok:{trunk_job}_0" in scripts[branch_job]

    # The branch waits for its trunk: submitting the sweep again now would train both twice. (The trunk, a few
    # steps long, may have finished by then; the branch cannot have.) The refusal names the jobs still queued.
    again = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    assert sorted(slurm_dir.glob("job-*.sbatch")) == sorted(slurm_dir / f"job-{job}.sbatch" for job in scripts)
    named = set(re.findall(r"\b\d+\b", again.stderr))
    assert branch_job in named and named <= {trunk_job, branch_job}, again.stderr

    for job, run in ((trunk_job, trunk), (branch_job, branch)):
        state = cluster.wait_for_state(f"{job}_0", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
        log = (run.config.run_dir / "slurm" / f"{job}_0.out").read_text()
        assert state == "COMPLETED", log
    assert branch.config.train.branch_from in log
    assert finished_with(branch.config) == [] and finished_with(trunk.config) == []


def fake_evaluated(config: Config) -> None:
    """A finished run's metrics as the loop writes them: the validation loss at its last step, and few-shot
    accuracy and task loss at k = 0 and 4 at half and all of its steps, each falling with N and D."""
    parameters, records = non_embedding_parameters(config), []
    for step in (config.train.max_steps // 2, config.train.max_steps):
        tokens = step * config.train.global_batch_tokens
        record = {"step": step, "val/loss": 2 + 40 / parameters ** 0.3 + 60 / tokens ** 0.3}
        for k in (0, 4):
            task_loss = 1 + 30 / parameters ** 0.35 + 50 / tokens ** 0.3 - 0.2 * (k > 0)
            record |= {f"eval/fewshot/word_labels/k={k}": 0.25 + 0.6 / (1 + math.exp(6 * (task_loss - 2.5))),
                       f"eval/fewshot/word_labels/k={k}/bits_per_byte": task_loss}
        records.append(record)
    (config.run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_a_finished_ladder_predicts_its_targets_at_each_k_into_the_sweeps_wandb_fit(tiny_config, tmp_path):
    base = tiny_config()
    bigger = tiny_config({"name": "bigger", "model": {"d_model": 256, "n_head": 4}}, "bigger.yaml")
    spec = write_sweep(tmp_path, base, sizes=[{"n_layer": 1, "d_model": 32, "n_head": 2},
                                              {"n_layer": 2, "d_model": 32, "n_head": 2},
                                              {"n_layer": 2, "d_model": 64, "n_head": 4}],
                       tokens_per_parameter=[20, 40, 80],
                       overrides=["logging.wandb_mode=offline", "eval.fewshot.interval=4"],
                       targets=[{"config": str(bigger), "tokens": 5e6}, {"parameters": 1e6, "tokens": 2e7}])
    for run in expand(load_sweep(spec)):
        fake_finished(run.config)
        fake_evaluated(run.config)
    result = run_module("launch", "sweep", "--spec", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep_dir = tmp_path / "runs" / "ladder"
    report = json.loads((sweep_dir / "task_scaling" / "task_scaling.json").read_text())
    assert [target["name"] for target in report["targets"]] == ["bigger,D=5e+06", "N=1e+06,D=2e+07"]
    assert report["targets"][0]["parameters"] == non_embedding_parameters(load_config(bigger))
    assert [(p["target"], p["shots"]) for p in report["predictions"]] == [
        ("bigger,D=5e+06", 0), ("bigger,D=5e+06", 4), ("N=1e+06,D=2e+07", 0), ("N=1e+06,D=2e+07", 4)]
    assert report["holdout"]["held_out"] == [f"ladder-l2-d64-tpp{tpp}-s0" for tpp in (20, 40, 80)]

    (offline_run,) = (sweep_dir / "scaling" / "wandb").glob("offline-run-*")
    summary = {}
    for record in wandb_records(offline_run):
        if record["type"] == "summary":
            summary.update(record["summary"]["update"])
    for prediction in report["predictions"]:
        prefix = f"task_scaling/{prediction['target']}/word_labels/k={prediction['shots']}"
        assert summary[f"{prefix}/accuracy"] == prediction["accuracy"]
        assert [summary[f"{prefix}/accuracy_low"], summary[f"{prefix}/accuracy_high"]] == prediction[
            "accuracy_interval"]
    assert summary["plots/task_scaling/curve._type"] == "image-file" and "law/E" in summary


BAD_TARGETS = {
    "neither a config nor a size": ({"targets": [{"parameters": 1e6}]}, "targets"),
    "far beyond the ladder": ({"targets": [{"parameters": 1e15, "tokens": 1e9}],
                               "overrides": ["eval.fewshot.interval=4"]}, "N = 1e+15"),
    "without few-shot evaluations to fit": ({"targets": [{"parameters": 1e6, "tokens": 1e7}],
                                             "overrides": ["eval.fewshot.interval=0"]}, "eval.fewshot.interval"),
}


@pytest.mark.parametrize("case", BAD_TARGETS, ids=list(BAD_TARGETS))
def test_a_sweep_target_that_cannot_be_predicted_is_refused_before_any_run(case, tiny_config, tmp_path, in_process):
    changes, named = BAD_TARGETS[case]
    spec = write_sweep(tmp_path, tiny_config(), **changes)
    result = in_process(launch_main, "sweep", "--spec", str(spec))
    assert result.returncode == 2 and named in result.stderr
    assert not (tmp_path / "runs").exists()
