"""The input of a fit: one `RunPoint` per trained run, from a CSV here or from run directories (which
`pretrain.rundir.reader.scaling_points` reads: the fit knows nothing of how a run was trained)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import CONFIG_ERROR_EXIT_CODE, UserError
from evals.fewshot_results import fewshot_metric


class ScalingError(UserError):
    """Runs a law cannot be fitted to, or a request it cannot answer; the message says what is missing."""

    exit_code = CONFIG_ERROR_EXIT_CODE  # bad input, as a config that cannot run


@dataclass(frozen=True)
class RunPoint:
    """One point of a ladder: N (without embeddings), D, the final validation loss, and what else is known."""

    name: str
    parameters: float
    tokens: float
    loss: float
    parameters_with_embeddings: float | None = None
    flops_per_token: float | None = None  # the model's own count (attention included), where known
    fewshot: dict[str, float] | None = None  # `eval/fewshot/<task>/k=<k>` at the last evaluation

    @property
    def compute(self) -> float:
        """Training FLOPs: the model's own count where known, else 6 N D."""
        return (self.flops_per_token or 6 * self.parameters) * self.tokens

    @property
    def nominal_compute(self) -> float:
        """6 N D: the compute a sweep sets its budgets in (launch/sweep.py), and the C of the isoFLOP profiles.
        The model's own count adds attention and the output head, a share that varies with size (from 1.8 to 3.2
        times 6 N D across configs/sweeps/micro-isoflop.yaml), and would split one budget into several."""
        return 6 * self.parameters * self.tokens

    def fewshot_accuracies(self) -> dict[tuple[str, int], float]:
        """The run's few-shot accuracies by (task, k), from its `eval/fewshot/<task>/k=<k>` values."""
        # Other values under the prefix (a table, say) are not accuracies.
        return {task_and_k: value for key, value in (self.fewshot or {}).items()
                if (task_and_k := fewshot_metric(key))}


CSV_COLUMNS = ("parameters", "tokens", "loss")
FEWSHOT_PREFIX = "eval/fewshot/"  # few-shot accuracies are named `eval/fewshot/<task>/k=<k>`, as in training


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's header and rows, or a ScalingError naming the file and what is wrong with it."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(file)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except OSError as error:
        raise ScalingError(f"{path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ScalingError(f"{path}: is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as error:
        raise ScalingError(f"{path}: is not a readable CSV ({error}); fix the file") from None


def read_csv(path: Path) -> list[RunPoint]:
    """Runs from a CSV with the columns parameters, tokens and loss (and optionally name, compute and few-shot
    accuracies in columns named `eval/fewshot/<task>/k=<k>`, a cell left empty where a run lacks one)."""
    _header, rows = read_csv_rows(path)
    missing = [column for column in CSV_COLUMNS if not rows or column not in rows[0]]
    if missing:
        raise ScalingError(f"{path}: needs a header with the columns {', '.join(CSV_COLUMNS)} (missing: "
                           f"{', '.join(missing)}) and at least one row")
    points = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {column: float(row[column]) for column in CSV_COLUMNS}
            compute = float(row["compute"]) if row.get("compute") else None
            fewshot = {column: float(cell) for column, cell in row.items()
                       if column and column.startswith(FEWSHOT_PREFIX) and cell}
        except (TypeError, ValueError):
            raise ScalingError(f"{path}:{line}: parameters, tokens and loss must be numbers (and compute and"
                               f" few-shot accuracies where given), got {row}") from None
        if compute is not None and not compute > 0:
            raise ScalingError(f"{path}:{line}: compute must be a positive number of FLOPs, got {row['compute']}")
        flops_per_token = compute / values["tokens"] if compute else None
        points.append(RunPoint(row.get("name") or f"row {line}", flops_per_token=flops_per_token,
                               fewshot=fewshot or None, **values))
    return points
