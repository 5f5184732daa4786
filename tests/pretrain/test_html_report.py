"""The local HTML report: built from a finished run's own files, drawn by a real headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.rundir.reader import RunDirectoryError, read_metrics
from tests.helpers import run_module

# Screenshots are kept here (or under $TEST_ARTIFACTS) after the run, to look at.
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
# matplotlib's first four default colours: the loss, learning-rate, throughput and few-shot lines.
LINE_COLOURS = {"C0": (0x1F, 0x77, 0xB4), "C1": (0xFF, 0x7F, 0x0E), "C2": (0x2C, 0xA0, 0x2C), "C3": (0xD6, 0x27, 0x28)}


def render_in_chromium(page: Path, screenshot: Path) -> list[str]:
    """Load the page in headless Chromium, save a screenshot, and return the page's console messages."""
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", f"--screenshot={screenshot}", "--window-size=900,4400", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.exists(), result.stderr
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def pixels_of(screenshot: Path, colour: tuple[int, int, int]) -> int:
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(colour)).sum(axis=-1) < 30).sum())


def test_the_report_of_a_finished_run_draws_its_charts_in_a_browser_with_no_console_errors(watched_run, tmp_path):
    result = run_module("pretrain.html_report", str(watched_run.run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = watched_run.run_dir / "report.html"
    assert str(page) in result.stdout
    text = page.read_text()
    # Loss, learning rate, throughput, accuracy against k, and accuracy during training for the one task.
    assert text.count("<figure><svg") == 5
    assert "<script" not in text and "<link" not in text and not re.search(r"""(src|href)=["']https?:""", text)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    assert render_in_chromium(page, screenshot) == []
    drawn = {name: pixels_of(screenshot, colour) for name, colour in LINE_COLOURS.items()}
    assert all(count > 300 for count in drawn.values()), drawn


def test_the_browser_check_sees_a_page_that_fails(tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><svg width='10' height='10'></svg><script>drawCharts();</script></body></html>")
    (message,) = render_in_chromium(broken, tmp_path / "broken.png")
    assert "drawCharts" in message
    assert pixels_of(tmp_path / "broken.png", LINE_COLOURS["C0"]) == 0


def test_a_report_of_a_directory_that_is_not_a_run_fails_naming_it(tmp_path):
    result = run_module("pretrain.html_report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'metrics.jsonl'}: ")
    assert not (tmp_path / "report.html").exists()


def test_a_damaged_metrics_file_is_named_with_its_line_and_the_earlier_report_is_kept(watched_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(watched_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    (run_dir / "report.html").write_text("the earlier report")
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 101, "train/loss": 2.\n{"step": 102}\n')  # a line damaged, and one after it
    lines = len((run_dir / "metrics.jsonl").read_text().splitlines()) - 1
    result = run_module("pretrain.html_report", str(run_dir), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {run_dir / 'metrics.jsonl'}:{lines}: ")
    assert (run_dir / "report.html").read_text() == "the earlier report"


def test_a_last_line_cut_short_as_it_was_written_is_dropped_and_the_records_before_it_read(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/lo')
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 3.0}]
    assert f"{tmp_path / 'metrics.jsonl'}:2" in capsys.readouterr().err


@pytest.mark.parametrize(("bad_line", "named"), [
    ('{"step": 3, "train/loss": 2.', ""),
    ('{"train/loss": 2.5}', ""),
    ('{"step": 3.5, "train/loss": 2.5}', "3.5"),  # the step that is not a whole number
])
def test_every_reader_of_metrics_refuses_a_bad_line_naming_the_file_and_line(tmp_path, bad_line, named):
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "train/loss": 3.0}}\n\n{bad_line}\n')
    with pytest.raises(RunDirectoryError) as refused:
        read_metrics(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'metrics.jsonl'}:3: ")
    assert named in str(refused.value)
    assert read_metrics(tmp_path / "not-started") == []
