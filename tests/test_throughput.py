"""The announced throughput: a start-up profile in CPU time, scaled by the real passes as they come."""

from __future__ import annotations

import threading
import time

import pytest

from peer.throughput import PRIOR_PASSES, PassProfile, ThroughputMeter, measure_pass_profile


def test_profile_predicts_pass_time_by_tokens():
    profile = PassProfile(fixed=0.004, per_token=0.001)
    assert profile.seconds(1) == pytest.approx(0.005)
    assert profile.seconds(8) == pytest.approx(0.012)
    assert profile.tokens_per_second == pytest.approx(200.0)


def test_real_passes_scale_the_profile_gradually_then_fully():
    profile = PassProfile(fixed=0.004, per_token=0.001)
    meter = ThroughputMeter(profile)
    assert meter.tokens_per_second == pytest.approx(200.0)  # nothing observed yet: the profile
    meter.observe(1, 1, 0.010)  # twice the profile's prediction
    assert meter.scale == pytest.approx(1 + 1 / (1 + PRIOR_PASSES))
    for i in range(200):
        tokens = (1, 3, 8)[i % 3]
        meter.observe(tokens, tokens, 2 * profile.seconds(tokens))  # every size costs twice
    assert meter.scale == pytest.approx(1 + 64 / (64 + PRIOR_PASSES))
    assert meter.tokens_per_second == pytest.approx(200.0 / meter.scale)


def test_passes_that_cost_more_once_in_a_while_do_not_move_the_figure():
    profile = PassProfile(fixed=0.01, per_token=0.001)
    meter = ThroughputMeter(profile)
    for i in range(60):
        tokens = 1 + i % 4
        meter.observe(tokens, tokens, profile.seconds(tokens) * (20 if i % 5 == 0 else 1))
    assert meter.scale == pytest.approx(1.0)


def test_two_twins_agree_whatever_their_batch_sizes():
    """The reason for scaling one profile rather than fitting a line per peer: twins that saw
    passes of different sizes announce the same."""
    profile = PassProfile(fixed=0.006, per_token=0.002)
    small, large = ThroughputMeter(profile), ThroughputMeter(profile)
    for i in range(40):
        small.observe(1, 1, 1.3 * profile.seconds(1))
        tokens = 4 + i % 5
        large.observe(tokens, tokens, 1.3 * profile.seconds(tokens))
    assert small.tokens_per_second == pytest.approx(large.tokens_per_second)


def test_meter_ignores_empty_passes_and_prefills():
    meter = ThroughputMeter(PassProfile(0.01, 0.0))
    for _ in range(20):
        meter.observe(0, 0, 1.0)
        meter.observe(1, 1, 0.0)
        meter.observe(1, 200, 1.0)
    assert meter.passes == 0 and meter.tokens_per_second == pytest.approx(100.0)
    with pytest.raises(ValueError):
        ThroughputMeter(PassProfile(0.01, 0.0), max_samples=0)


@pytest.mark.parametrize("span", [(0, 2), (2, 4)])
def test_profile_of_a_real_span(demo_model, span):
    from peer.model import BlockSpan

    profile = measure_pass_profile(BlockSpan.load(demo_model, *span), rounds=3, spread_s=0.0)
    assert profile.fixed > 0 and profile.per_token >= 0
    assert profile.seconds(8) >= profile.seconds(1)


def test_thread_cpu_time_leaves_out_waiting():
    """What the meter relies on: a thread that waits (here: sleeps, as it would waiting for a core
    another process holds) spends no CPU time, while wall time counts it all."""
    measured = {}

    def work() -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        time.sleep(0.2)
        measured["cpu"], measured["wall"] = time.thread_time() - cpu, time.perf_counter() - wall

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert measured["wall"] >= 0.2 and measured["cpu"] < 0.05


def test_later_quiet_rounds_refine_a_profile_taken_under_contention():
    slow_start = PassProfile(fixed=0.0030, per_token=0.0010)  # measured while the twin loaded
    meter = ThroughputMeter(slow_start)
    meter.refine(0.0025, 0.0200)  # a quieter moment, one point only
    assert meter.profile.seconds(1) == pytest.approx(0.0025)
    meter.refine(0.0020, 0.0170)
    meter.refine(0.0031, 0.0190)  # slower again: the fastest rounds stand
    assert meter.profile.seconds(1) == pytest.approx(0.0020)
    assert meter.profile.seconds(16) == pytest.approx(0.0170)
    meter.observe(1, 1, 0.0030)  # real passes are compared with the refined profile
    assert meter.scale == pytest.approx(1 + 0.5 / (1 + PRIOR_PASSES))


def test_pass_timer_runs_the_schedulers_pass_code(demo_model):
    from peer.model import BlockSpan
    from peer.throughput import PassTimer

    timer = PassTimer(BlockSpan.load(demo_model, 0, 2))
    one, many = timer.pair()
    assert one > 0 and many > 0
