"""The training benchmark, run on the CPU as a user runs it: the tiny shape through both paths."""

import json
import statistics
import subprocess
import sys

import pytest

from pretrain.bench_step import main as bench_main
from pretrain.config import load_config
from pretrain.model import GPT
from tests.helpers import run_module


def test_bench_times_the_deepspeed_path_against_the_plain_pytorch_baseline(tmp_path):
    output = tmp_path / "bench.json"
    result = run_module("pretrain.bench_step", "--steps", "3", "--warmup-steps", "1", "--repeats", "2",
                        "--json", str(output), cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    summary = json.loads(output.read_text())
    assert summary["torch"] and summary["deepspeed"] and summary["device"]
    assert summary["command"].startswith("python -m pretrain.bench_step --steps 3")
    records = {record["path"]: record for record in summary["records"]}
    assert sorted(records) == ["baseline", "deepspeed"]
    tiny = load_config(None, ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.seq_len=64",
                              "model.vocab_size=512"])
    for record in records.values():
        assert record["shape"] == "tiny"
        assert record["parameters"] == GPT(tiny.model).num_parameters()
        assert len(record["step_tokens_per_second"]) == 3 * 2  # timed steps x rounds; warmup discarded
        assert record["tokens_per_second_median"] == statistics.median(record["step_tokens_per_second"]) > 0
        assert record["mfu"] is None and record["peak_memory_bytes"] is None  # no peak FLOP/s or split on a CPU
    baseline, deepspeed = (records[path]["tokens_per_second_median"] for path in ("baseline", "deepspeed"))
    assert records["deepspeed"]["ratio_to_baseline"] == pytest.approx(deepspeed / baseline)
    assert records["baseline"]["ratio_to_baseline"] == 1.0
    assert records["deepspeed"]["zero_stage"] == 2 and records["baseline"]["zero_stage"] is None



def test_an_unknown_shape_is_one_line_naming_the_option(in_process):
    result = in_process(bench_main, "--shapes", "tiny,gpt2-xl")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--shapes" in result.stderr and "gpt2-xl" in result.stderr


def test_steps_below_one_are_refused(in_process):
    result = in_process(bench_main, "--steps", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("config error: --steps:")


def test_the_bench_imports_neither_wandb_nor_pyarrow():
    # The GPU image it runs on has neither.
    probe = ("import sys, pretrain.bench_step;"
             " print(sorted({'wandb', 'pyarrow'} & {m.split('.')[0] for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
