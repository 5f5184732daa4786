"""The few-shot evaluation as a user runs it on a trained checkpoint: in the training loop, from the command
line, through Hugging Face transformers, and against lm-evaluation-harness."""

import csv
import importlib.util
import json

import pytest
import torch
import yaml

from data_pipeline.tokenizer import END_OF_DOCUMENT
from evals.__main__ import main as evals_main
from evals.fewshot import evaluate
from evals.tasks import load_task
from pretrain.config import merged
from pretrain.model import GPT
from pretrain.rundir.points import scaling_point, task_points
from pretrain.rundir.reader import load_checkpoint, read_metrics, run_config, run_tokenizer
from tests.helpers import TINY_CONFIG, launch, run_module

FEWSHOT = {"tasks": ["word_labels"], "shots": [0, 2, 4], "items": 24, "items_in_loop": 24, "interval": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-rank run whose loop evaluated few-shot accuracy at steps 4 and 8."""
    root = tmp_path_factory.mktemp("fewshot")
    config = merged(TINY_CONFIG, {"eval": {"fewshot": FEWSHOT}})
    config.update(output_dir=str(root / "runs"))
    config["data"]["dir"] = str(root / "data")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    launch(path)
    return root, root / "runs" / "tiny"


def test_the_training_loop_logs_accuracy_at_each_k_and_the_command_line_reproduces_it(trained):
    root, run_dir = trained
    logged = {r["step"]: r for r in read_metrics(run_dir) if "eval/fewshot/word_labels/k=0" in r}
    assert sorted(logged) == [4, 8]

    result = run_module("evals", "fewshot", "--checkpoint", str(run_dir), "--no-wandb", cwd=root)
    assert result.returncode == 0, result.stderr
    out = run_dir / "fewshot" / "step_00000008"
    written = json.loads((out / "fewshot.json").read_text())
    assert written["step"] == 8 and [s["k"] for s in written["scores"]] == [0, 2, 4]
    for score in written["scores"]:
        assert score["items"] == 24
        assert score["acc"] == pytest.approx(logged[8][f"eval/fewshot/word_labels/k={score['k']}"], abs=1e-9)
    rows = list(csv.DictReader((out / "fewshot.csv").open()))
    assert [(r["task"], int(r["k"])) for r in rows] == [("word_labels", 0), ("word_labels", 2), ("word_labels", 4)]
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_task_file_is_named_and_earlier_results_are_kept(trained, tmp_path):
    root, run_dir = trained
    out = tmp_path / "out"
    assert run_module("evals", "fewshot", "--checkpoint", str(run_dir), "--no-wandb", "--shots", "0",
                      "--out", str(out), cwd=root).returncode == 0
    before = (out / "fewshot.json").read_text()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0}\n'
                      '{"context": "b", "choices": ["x"], "gold": 0}\n')
    result = run_module("evals", "fewshot", "--checkpoint", str(run_dir), "--no-wandb", "--tasks", str(broken),
                        "--out", str(out), cwd=root)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {broken}:2: ") and "'choices'" in result.stderr  # the file, line, field
    assert (out / "fewshot.json").read_text() == before


def test_an_export_replaces_an_earlier_export_and_nothing_else(trained, tmp_path, in_process):
    root, run_dir = trained
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("a week of notes")
    refused = in_process(evals_main, "export-hf", "--checkpoint", str(run_dir), "--out", str(precious))
    assert refused.returncode == 1 and str(precious) in refused.stderr
    assert [path.name for path in precious.iterdir()] == ["notes.txt"]

    out = tmp_path / "hf"
    assert in_process(evals_main, "export-hf", "--checkpoint", str(run_dir), "--out", str(out)).returncode == 0
    (out / "left-over.txt").write_text("from the earlier export")
    assert in_process(evals_main, "export-hf", "--checkpoint", str(run_dir), "--out", str(out)).returncode == 0
    assert (out / "config.json").is_file() and not (out / "left-over.txt").exists()


def test_the_exported_transformers_model_gives_the_projects_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run_dir = trained
    result = run_module("evals", "export-hf", "--checkpoint", str(run_dir), cwd=root)
    assert result.returncode == 0, result.stderr
    hf_dir = run_dir / "hf" / "step_00000008"
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    trained = load_checkpoint(run_dir)
    model, config = trained.model, trained.config
    text = "vuvi lili dolu vuru vuvi lili mobu"
    ids = run_tokenizer(config).encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))
        theirs = hf_model(torch.tensor([ids])).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed")
def test_lm_evaluation_harness_agrees_on_the_same_prompts(trained, tmp_path):
    root, run_dir = trained
    hf_dir = tmp_path / "hf"
    exported = run_module("evals", "export-hf", "--checkpoint", str(run_dir), "--out", str(hf_dir), cwd=root)
    assert exported.returncode == 0, exported.stderr
    tasks_dir = tmp_path / "tasks"
    result = run_module("evals", "lm-eval-tasks", "--tasks", "word_labels", "--shots", "4", "--items", "60",
                        "--out", str(tasks_dir), cwd=root)
    assert result.returncode == 0, result.stderr
    harness = run_module(
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32", "--tasks",
        "word_labels_4shot", "--include_path", str(tasks_dir), "--num_fewshot", "0", "--device", "cpu",
        "--batch_size", "16", "--output_path", str(tmp_path / "lm_eval"), cwd=root,
    )
    assert harness.returncode == 0, harness.stderr[-3000:]
    [results_file] = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["word_labels_4shot"]

    trained = load_checkpoint(run_dir)
    model, config = trained.model, trained.config
    tokenizer = run_tokenizer(config)
    [ours] = evaluate(model, tokenizer, [load_task("word_labels", items=60)], [4], context_length=config.model.seq_len,
                      end_of_document_id=tokenizer.token_to_id(END_OF_DOCUMENT))
    assert ours.items == 60
    assert abs(ours.acc - theirs["acc,none"]) <= 0.005
    assert abs(ours.acc_norm - theirs["acc_norm,none"]) <= 0.005


def test_a_finished_run_gives_its_scaling_point_and_one_run_is_too_few_to_fit(trained):
    root, run_dir = trained
    point = scaling_point(run_dir)
    model = GPT(run_config(run_dir).model)
    assert point.parameters == model.num_parameters(include_embeddings=False)
    assert point.tokens == TINY_CONFIG["train"]["max_steps"] * TINY_CONFIG["train"]["global_batch_tokens"]
    assert point.loss == [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r][-1]
    assert point.compute == model.flops_per_token() * point.tokens
    assert set(point.fewshot_accuracies()) == {("word_labels", k) for k in FEWSHOT["shots"]}
    assert all(point.fewshot[f"eval/fewshot/word_labels/k={k}/bits_per_byte"] > 0 for k in FEWSHOT["shots"])

    result = run_module("evals", "scaling", "--runs", str(run_dir.parent), "--out", str(root / "fit"), cwd=root)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: 1 runs: ")  # how many runs it found


def test_zero_items_is_refused_before_anything_is_written(tmp_path, in_process):
    out = tmp_path / "tasks"
    result = in_process(evals_main, "lm-eval-tasks", "--tasks", "word_labels", "--shots", "0", "--items", "0",
                        "--out", str(out))
    assert result.returncode == 2 and "--items" in result.stderr
    assert not out.exists()


def test_a_benchmark_scored_from_the_command_line_takes_all_its_items_and_bad_requests_exit_2(trained, tmp_path):
    root, run_dir = trained
    out = tmp_path / "copa"
    result = run_module("evals", "fewshot", "--checkpoint", str(run_dir), "--tasks", "copa", "--items", "500",
                        "--shots", "0,2", "--examples", "shared", "--out", str(out), "--no-wandb", cwd=root)
    assert result.returncode == 0, result.stderr
    scores = json.loads((out / "fewshot.json").read_text())["scores"]
    assert [(score["task"], score["k"], score["items"]) for score in scores] == [("copa", 0, 100), ("copa", 2, 100)]
    assert all(0 <= score["acc_norm"] <= 1 and score["bits_per_byte"] > 0 for score in scores)

    empty = tmp_path / "mine"
    empty.mkdir()
    # Each bad request, and what its refusal names: the unknown benchmark, the k too large, the missing folder.
    for bad, named in ((["--tasks", "copa,no_such_benchmark"], "no_such_benchmark"),
                       (["--tasks", "copa", "--shots", "0,100"], "100"),
                       (["--tasks", "copa", "--benchmarks-dir", str(empty)], str(empty / "copa"))):
        refused = run_module("evals", "fewshot", "--checkpoint", str(run_dir), *bad, "--out", str(tmp_path / "no"),
                             "--no-wandb", cwd=root)
        assert refused.returncode == 2, refused.stderr
        assert named in refused.stderr, refused.stderr
        assert not (tmp_path / "no").exists()


def test_a_finished_run_gives_a_task_scaling_point_at_each_evaluation_task_and_k(trained):
    _root, run_dir = trained
    points = task_points(run_dir)
    records = {record["step"]: record for record in read_metrics(run_dir) if "eval/fewshot/word_labels/k=0" in record}
    assert sorted(records) == [4, 8]
    assert [(p.tokens, p.shots) for p in points] == [(step * TINY_CONFIG["train"]["global_batch_tokens"], k)
                                                     for step in (4, 8) for k in FEWSHOT["shots"]]
    model = GPT(run_config(run_dir).model)
    for point in points:
        name = f"eval/fewshot/word_labels/k={point.shots}"
        record = records[point.tokens // TINY_CONFIG["train"]["global_batch_tokens"]]
        assert (point.run, point.task, point.accuracy, point.task_loss) == (
            "tiny", "word_labels", record[name], record[f"{name}/bits_per_byte"])
        assert point.parameters == model.num_parameters(include_embeddings=False)
