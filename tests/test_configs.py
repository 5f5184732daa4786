"""Every config the project ships loads, a config named for a size has that many parameters, every model shape
trains as it is (named after its file, its data in a folder of its own), and every sweep expands."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from evals.benchmarks import load_evaluation_tasks
from launch.sweep import expand
from launch.sweep_spec import load_sweep, sweep_targets
from pretrain.config import load_config
from pretrain.model import GPT
from pretrain.rundir.reader import read_metrics
from tests.helpers import run_module

CONFIGS = Path(__file__).parents[1] / "configs"
SHIPPED = sorted(path for path in CONFIGS.rglob("*.yaml") if "sweeps" not in path.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: str(path.relative_to(CONFIGS)))
def test_a_shipped_config_loads_and_a_size_in_its_name_is_its_parameter_count(path):
    config = load_config(path)
    size = re.search(r"-(\d+(?:\.\d+)?)([mb])\b", path.stem)
    if size:
        named = float(size[1]) * {"m": 1e6, "b": 1e9}[size[2]]
        with torch.device("meta"):  # shapes only: a 1.5B model allocates nothing
            parameters = GPT(config.model).num_parameters()
        assert parameters == pytest.approx(named, rel=0.05)


MODELS = sorted((CONFIGS / "models").glob("*.yaml"))


def test_a_config_without_a_name_runs_under_its_file_name_with_its_own_data_folder(tmp_path):
    for path in MODELS:
        config = load_config(path)
        assert (config.name, config.data.dir) == (path.stem, f"data/{path.stem}")
    assert load_config(path, ["name=mine"]).name == "mine"  # a name given is kept, and so is a data folder
    assert load_config(path, ["data.dir=elsewhere"]).data.dir == "elsewhere"
    quickstart = load_config(CONFIGS / "quickstart.yaml")
    assert (quickstart.name, quickstart.data.dir) == ("quickstart", "data/quickstart")
    assert load_config(None).name == "quickstart"  # no file: the defaults, which are the quickstart's


@pytest.mark.parametrize("path", MODELS, ids=lambda path: path.stem)
def test_every_shipped_model_shape_trains_a_step_on_the_embedded_corpus_as_it_is(path, tmp_path, shared_runs):
    # The shape's own blocks, heads, key/value heads, positions, vocabulary and embeddings; one layer, 4 dimensions a
    # head and a short context, so that a 1.5B shape steps on a CPU. Its run lands where a user's would; the shapes
    # of one vocabulary share a small corpus, prepared once.
    model = load_config(path).model
    data_dir = shared_runs.root / f"episodes-{model.vocab_size}"
    tiny = ["model.n_layer=1", f"model.d_model={4 * model.n_head}", "model.seq_len=64", "train.global_batch_tokens=64",
            "train.micro_batch_size=1", "train.max_steps=1", "train.warmup_steps=0", "eval.interval=0",
            f"data.dir={data_dir}", "data.sources=[{kind: icl_episodes, episodes: 300}]",
            "logging.wandb_mode=disabled"]
    result = run_module("pretrain.train", "--config", str(path), *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [record for record in read_metrics(tmp_path / "runs" / path.stem) if "train/loss" in record]
    assert record["step"] == 1 and math.isfinite(record["train/loss"])
    assert json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]


def test_the_presets_take_their_shape_and_recipe_from_the_files_they_include():
    preset = load_config(CONFIGS / "presets" / "gpt2-124m-parquet.yaml")
    shape = load_config(CONFIGS / "models" / "gpt2-124m.yaml")
    assert preset.model == shape.model and preset.train.lr == shape.train.lr == 6.0e-4
    assert preset.data == load_config(CONFIGS / "data" / "parquet-corpus.yaml").data
    assert preset.train.max_steps == 19073  # its own setting, on top of what it includes


def test_the_presets_evaluate_benchmarks_in_the_loop_that_load():
    for preset in ("gpt2-124m-parquet.yaml", "llama-1b-parquet.yaml"):
        fewshot = load_config(CONFIGS / "presets" / preset).eval.fewshot
        tasks = load_evaluation_tasks(fewshot.tasks, items=fewshot.items_in_loop)
        assert fewshot.interval > 0 and [task.name for task in tasks] == ["hellaswag", "arc_easy", "piqa"]
        assert all(len(task.items) == min(500, len(task.items)) and task.pool_size(0) >= max(fewshot.shots)
                   for task in tasks)


SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda path: path.stem)
def test_a_shipped_sweep_expands_and_its_targets_lie_beyond_its_ladder(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # a spec names its base config from the repository's root
    sweep = load_sweep(path)
    runs = expand(sweep)
    assert len(runs) == len(sweep.sizes) * len(sweep.seeds) * len(sweep.tokens_per_parameter or sweep.compute_budgets)
    for target in sweep_targets(sweep, runs):  # a prediction, not an interpolation: at least 4x the ladder's largest N
        assert target.parameters >= 4 * max(run.parameters for run in runs)
