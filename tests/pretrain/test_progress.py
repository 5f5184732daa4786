"""Progress metrics, in-process: throughput, MFU and data wait from a step's timings; when a run reports."""

import pytest
import torch

from pretrain.progress import Progress, duration


def progress(peak_flops: float | None = 1e12, print_every: int = 5, last_step: int = 12) -> Progress:
    return Progress(tokens_per_step=2048, flops_per_token=6_000, peak_flops=peak_flops, world_size=2,
                    print_every=print_every, last_step=last_step, device=torch.device("cpu"),
                    read_system_metrics=lambda device: {"system/cpu_memory_rss_gib": 1.5})


def test_step_metrics_are_throughput_mfu_and_the_share_of_the_step_spent_waiting_for_data():
    metrics = progress().step_metrics(step_seconds=0.5, data_wait_seconds=0.1)
    assert metrics == {
        "perf/tokens_per_second": 4096.0,
        # 6,000 FLOPs a token at 4,096 tokens/s over two devices of 1e12 FLOP/s each
        "perf/mfu": pytest.approx(6_000 * 4096 / 2e12),
        "perf/step_seconds": 0.5,
        "perf/data_wait_fraction": pytest.approx(0.2),
    }


def test_without_a_known_peak_there_is_no_mfu():
    assert progress(peak_flops=None).step_metrics(1.0, 0.0)["perf/mfu"] is None


def test_a_run_reports_every_print_every_steps_and_at_the_last_with_system_metrics():
    reporting = progress(print_every=5, last_step=12)
    assert [step for step in range(1, 13) if reporting.due(step)] == [5, 10, 12]
    assert reporting.system_metrics() == {"system/cpu_memory_rss_gib": 1.5}


def test_the_progress_line_shows_the_validation_loss_only_at_steps_that_have_one():
    metrics = {"train/loss": 3.25, "train/lr": 1e-3, **progress().step_metrics(0.5, 0.1)}
    assert "3.2500" in progress().line(5, metrics) and "val" not in progress().line(5, metrics)
    assert "2.5000" in progress().line(5, {**metrics, "val/loss": 2.5})


def test_the_time_left_is_the_remaining_steps_at_the_median_pace_of_the_recent_ones():
    reporting = progress(last_step=100)
    assert reporting.seconds_left(0) == 0.0
    for seconds in (0.5, 0.5, 9.0, 0.5, 0.5):  # one slow step (a validation) does not move the estimate
        reporting.step_metrics(seconds, 0.0)
    assert reporting.seconds_left(60) == pytest.approx(40 * 0.5)
    metrics = {"train/loss": 3.0, "train/lr": 1e-3, **reporting.step_metrics(0.5, 0.0)}
    assert reporting.line(60, metrics).endswith("| 20s left")
    assert "left" not in reporting.line(100, metrics)


@pytest.mark.parametrize(("seconds", "shown"), [(12.4, "12s"), (250, "4m10s"), (3900, "1h05m")])
def test_a_duration_reads_in_hours_minutes_or_seconds(seconds, shown):
    assert duration(seconds) == shown
