"""The recipe of docs/launching.md, "GPT-2 124M on your parquet corpus", run as a user types it (make, the shipped
preset, its data recipe edited to point at the corpus) on a small generated corpus in the same schema, with the
model shape overridden to a tiny one. The SLURM half is checked through its dry runs."""

import json
import random
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from launch.planner import gpu_precision, make_plan
from pretrain.config import load_config
from tests.helpers import losses_by_step

REPOSITORY = Path(__file__).parents[2]
WORDS = ("the model reads tokens and predicts the next one while attention mixes context across positions of"
         " every layer so that loss falls as training goes on over the corpus").split()
TINY_SHAPE = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.seq_len=64", "model.vocab_size=512",
              "train.global_batch_tokens=8192", "train.micro_batch_size=4", "train.max_steps=12",
              "train.warmup_steps=2", "eval.interval=6", "eval.batches=2", "data.partitions=4",
              "deepspeed.precision=fp32", "logging.wandb_mode=disabled",
              # The preset's in-loop HellaSwag has answers longer than this 64-token context (refused, exit 2).
              "eval.fewshot.interval=0"]


def write_corpus(directory: Path) -> None:
    """Three parquet files with a `text` column, as the data recipe expects."""
    directory.mkdir()
    generator = random.Random(0)
    for part in range(3):
        texts = [" ".join(generator.choice(WORDS) for _ in range(generator.randint(20, 80))) for _ in range(1500)]
        pq.write_table(pa.table({"text": texts}), directory / f"part-{part}.parquet", row_group_size=500)


def make(target: str, config: Path, args: list[str], backend: str = "local") -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", target, f"BACKEND={backend}", f"CONFIG={config}", f"ARGS={' '.join(args)}"],
                          cwd=REPOSITORY, capture_output=True, text=True, timeout=900)


def test_the_gpt2_124m_parquet_recipe_runs_end_to_end_on_a_small_corpus(tmp_path):
    write_corpus(tmp_path / "corpus")
    # What the recipe asks of a user: the data recipe's paths and directory point at their corpus.
    configs = tmp_path / "configs"
    shutil.copytree(REPOSITORY / "configs", configs)
    recipe = configs / "data" / "parquet-corpus.yaml"
    tree = yaml.safe_load(recipe.read_text())
    tree["data"]["sources"][0]["paths"] = [str(tmp_path / "corpus" / "*.parquet")]
    tree["data"]["dir"] = str(tmp_path / "data")
    recipe.write_text(yaml.safe_dump(tree))
    preset = configs / "presets" / "gpt2-124m-parquet.yaml"
    args = [*TINY_SHAPE, f"output_dir={tmp_path / 'runs'}"]

    planned = subprocess.run([str(REPOSITORY / ".venv" / "bin" / "python"), "-m", "launch", "plan", "--config",
                              str(preset), "--gpus", "2", "--gpu-memory", "80GiB", *args],
                             cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr
    config = load_config(preset, args)
    plan = make_plan(config, 2, 80 * 2**30, gpu_precision(config))
    assert plan.fits and planned.stdout.splitlines()[-1] == plan.recommendation

    prepared = make("data", preset, args)
    assert prepared.returncode == 0, prepared.stderr
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["tokenizer_vocab_size"] <= 512 and manifest["splits"]["train"]

    dry = make("train", preset, ["--dry-run", *args])
    assert dry.returncode == 0, dry.stderr
    assert "pretrain.train" in dry.stdout.splitlines()[-1]

    trained = make("train", preset, args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "runs" / "gpt2-124m"
    assert (run_dir / "checkpoints" / "step_00000012" / "complete").exists()
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]

    # On 4 nodes of 8 GPUs through SLURM: the preparation array and the training job, as their dry runs print them.
    slurm_data = make("data", preset, ["--tasks", "4", "--dry-run", *args], backend="slurm")
    assert slurm_data.returncode == 0, slurm_data.stderr
    assert "#SBATCH --array=0-3" in slurm_data.stdout
    slurm_run = make("train", preset, ["--nodes", "4", "--gpus-per-node", "8", "--gpu-memory", "80GiB", "--dry-run",
                                       *args], backend="slurm")
    assert slurm_run.returncode == 0, slurm_run.stderr
    lines = slurm_run.stdout.splitlines()
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --gpus-per-node=8" in lines
    assert make_plan(config, 32, 80 * 2**30, gpu_precision(config)).recommendation in lines
