"""images/s (and the ETA `trainctl status` computes from it) is smoothed over about a minute of optimizer steps."""
from __future__ import annotations

import json

import pytest
from conftest import config_text, make_run, run_worker

from trainctl.contract.protocol import ExitCode
from trainctl.worker.report import StepRate

IMAGES = 16   # an effective batch


def eta(rate: StepRate, steps_left: int) -> float:
    """The ETA as supervisor/status.py computes it from the heartbeat."""
    return steps_left * IMAGES / rate.per_second


def steady(rate: StepRate, seconds_per_step: float, total_seconds: float) -> None:
    for _ in range(round(total_seconds / seconds_per_step)):
        rate.add(seconds_per_step, IMAGES)


def test_one_slow_step_barely_moves_the_rate_or_the_eta():
    """The issue's jump: 54 images/s, then one step that ran at 13 (a loader hiccup); the ETA went 50 s → 3 m 39 s."""
    rate = StepRate()
    steady(rate, IMAGES / 54, 120)
    before = rate.per_second
    assert before == pytest.approx(54)
    eta_before = eta(rate, 170)
    rate.add(IMAGES / 13, IMAGES)
    assert abs(rate.per_second / before - 1) < 0.02
    assert abs(eta(rate, 169) / eta_before - 1) < 0.02


def test_a_real_change_of_speed_shows_within_the_window():
    rate = StepRate(window=60)
    steady(rate, 0.25, 120)                  # 64 images/s
    steady(rate, 0.5, 30)                    # half a minute at half the speed: on the way down
    assert 32 < rate.per_second < 64 * 0.8
    steady(rate, 0.5, 30)                    # a whole minute at 32 images/s: that is the rate now
    assert rate.per_second == pytest.approx(32)


def test_the_first_step_of_a_process_counts_only_until_a_second_one_is_in():
    rate = StepRate()
    assert rate.per_second is None
    rate.add(8.0, IMAGES)                    # loader processes starting, first allocations
    assert rate.per_second == pytest.approx(2)
    rate.add(0.2, IMAGES)
    assert rate.per_second == pytest.approx(80)
    rate.add(0.4, IMAGES)                    # from now on every step counts
    assert rate.per_second == pytest.approx(2 * IMAGES / 0.6)


def test_the_window_is_step_time_so_a_pause_between_steps_does_not_empty_it():
    """Checkpoint waits and validation are not added: after ten minutes of validation the window still holds
    the last minute of steps, and a slow step right after it is one step among them."""
    rate = StepRate(window=60)
    steady(rate, 0.2, 90)
    rate.add(1.0, IMAGES)                    # the first step after the pause
    assert rate.per_second > 0.95 * IMAGES / 0.2


def test_a_step_longer_than_the_window_is_the_rate_on_its_own():
    rate = StepRate(window=60)
    steady(rate, 0.5, 60)
    rate.add(90.0, IMAGES)                   # e.g. a swapping machine
    assert rate.per_second == pytest.approx(IMAGES / 90.0)


def test_the_heartbeat_the_metrics_lines_and_the_console_share_one_smoothed_rate(tmp_path, dataset):
    """A real worker: the heartbeat's images_per_sec (what `trainctl status` makes the ETA from) is the very
    number of the metrics line of the same step, and of its console line."""
    run_dir = make_run(tmp_path, "rate", config_text("rate", dataset))
    result = run_worker(run_dir)
    assert result.returncode == ExitCode.OK, result.stdout + result.stderr
    heartbeat = json.loads((run_dir / "heartbeat.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if line["kind"] == "train"][-1]
    assert last["step"] == heartbeat["step"] == heartbeat["total_steps"]   # the last step was logged
    assert heartbeat["images_per_sec"] > 0 and last["images_per_sec"] == heartbeat["images_per_sec"]
    assert f"{heartbeat['images_per_sec']:.1f} img/s" in [line for line in result.stdout.splitlines()
                                                          if f"step {last['step']}/" in line][0]
