"""The input of a task-scaling fit: one `TaskPoint` per evaluated checkpoint, task and k, from a long CSV here or
from run directories (which `pretrain.rundir.reader.task_points` reads), and the `Target`s it predicts.

The CSV has the columns `run,parameters,tokens,task,shots,task_loss,accuracy`: N without embeddings, the tokens
seen at that checkpoint, and the task loss (bits per byte of the gold continuation given the prompt)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import astuple, dataclass
from pathlib import Path

from evals.scaling.points import ScalingError, read_csv_rows

TASK_CSV_COLUMNS = ("run", "parameters", "tokens", "task", "shots", "task_loss", "accuracy")


@dataclass(frozen=True)
class TaskPoint:
    """One task at one k, evaluated at one checkpoint of one run."""

    run: str
    parameters: float  # without embeddings
    tokens: float  # seen at this checkpoint
    task: str
    shots: int
    task_loss: float  # bits per byte of the gold continuation
    accuracy: float


def _checked(path: Path, line: int, row: dict[str, str]) -> TaskPoint:
    values = {}
    for column in ("parameters", "tokens", "task_loss", "accuracy"):
        try:
            values[column] = float(row[column])
        except ValueError:
            raise ScalingError(f"{path}:{line}: {column} must be a number, got {row[column]!r}") from None
        if not math.isfinite(values[column]):
            raise ScalingError(f"{path}:{line}: {column} must be a finite number, got {row[column]!r}")
    try:
        shots = int(row["shots"])
    except ValueError:
        raise ScalingError(f"{path}:{line}: shots must be a whole number of examples, got {row['shots']!r}") from None
    for column in ("parameters", "tokens", "task_loss"):
        if values[column] <= 0:
            raise ScalingError(f"{path}:{line}: {column} must be positive, got {row[column]!r}")
    if not 0 <= values["accuracy"] <= 1:
        raise ScalingError(f"{path}:{line}: accuracy must be between 0 and 1, got {row['accuracy']!r}")
    if shots < 0 or not row["run"] or not row["task"]:
        raise ScalingError(f"{path}:{line}: needs a run name, a task name and shots >= 0, got {dict(row)}")
    return TaskPoint(run=row["run"], task=row["task"], shots=shots, **values)


def read_task_csv(path: Path) -> list[TaskPoint]:
    """The points of a long CSV with the columns TASK_CSV_COLUMNS (others are ignored)."""
    header, rows = read_csv_rows(path)
    missing = [column for column in TASK_CSV_COLUMNS if column not in header]
    if missing:
        raise ScalingError(f"{path}: needs the columns {','.join(TASK_CSV_COLUMNS)}; missing: {', '.join(missing)}")
    if not rows:
        raise ScalingError(f"{path}: has a header and no rows; it needs one row per evaluated checkpoint, task and k")
    for line, row in enumerate(rows, start=2):
        if None in row or any(row[column] is None for column in TASK_CSV_COLUMNS):
            raise ScalingError(f"{path}:{line}: has {len(row) - (None in row)} cells where the header has"
                               f" {len(header)}; fix the row")
    return [_checked(path, line, row) for line, row in enumerate(rows, start=2)]


def task_csv_text(points: list[TaskPoint]) -> str:
    """The points as the long CSV `read_task_csv` reads."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TASK_CSV_COLUMNS)
    writer.writerows(astuple(point) for point in points)
    return text.getvalue()


@dataclass(frozen=True)
class Target:
    """A model not trained yet: N without embeddings, and the tokens it will be trained on."""

    name: str
    parameters: float
    tokens: float

    @classmethod
    def of_size(cls, parameters: float, tokens: float) -> Target:
        """A target given by its N and D alone, named after them."""
        return cls(f"N={parameters:.3g},D={tokens:.3g}", parameters, tokens)
