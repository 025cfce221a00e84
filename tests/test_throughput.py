"""The announced throughput: a start-up profile corrected by the median of recent real passes."""

from __future__ import annotations

import pytest

from peer.throughput import MIN_SAMPLES, PassProfile, ThroughputMeter, measure_pass_profile
from tests.conftest import FakeClock


def test_profile_predicts_pass_time_by_tokens():
    profile = PassProfile(fixed=0.004, per_token=0.001)
    assert profile.seconds(1) == pytest.approx(0.005)
    assert profile.seconds(8) == pytest.approx(0.012)
    assert profile.tokens_per_second == pytest.approx(200.0)


def test_meter_fits_real_passes_whatever_their_batch(fake_clock: FakeClock):
    profile = PassProfile(fixed=0.004, per_token=0.001)
    meter = ThroughputMeter(profile, window_s=10.0, clock=fake_clock)
    assert meter.tokens_per_second == pytest.approx(200.0)  # nothing observed yet: the profile
    slower = PassProfile(fixed=0.008, per_token=0.0005)  # the machine now: another shape entirely
    for i in range(MIN_SAMPLES * 4):
        tokens = (1, 3, 8, 20)[i % 4]
        meter.observe(tokens, tokens, slower.seconds(tokens))
    fitted = meter.fit()
    assert fitted.fixed == pytest.approx(0.008) and fitted.per_token == pytest.approx(0.0005)
    fake_clock.advance(1.0)
    assert meter.tokens_per_second == pytest.approx(1 / 0.0085)


def test_passes_that_waited_behind_another_process_do_not_move_the_figure(fake_clock: FakeClock):
    meter = ThroughputMeter(PassProfile(fixed=0.01, per_token=0.0), window_s=10.0, clock=fake_clock)
    for i in range(40):
        tokens = 1 + i % 4
        seconds = 0.01 + 0.001 * tokens
        meter.observe(tokens, tokens, seconds * (20 if i % 5 == 0 else 1))  # one pass in five
    assert 1 / meter.tokens_per_second == pytest.approx(0.011, rel=0.05)


def test_one_size_of_pass_keeps_the_profile_slope_and_old_passes_age_out(fake_clock: FakeClock):
    profile = PassProfile(fixed=0.01, per_token=0.002)
    meter = ThroughputMeter(profile, window_s=10.0, clock=fake_clock)
    for _ in range(MIN_SAMPLES):
        meter.observe(4, 4, 0.038)  # twice the profile's 0.018 at 4 tokens, all of one size
    assert meter.fit() == PassProfile(fixed=0.030, per_token=0.002)
    fake_clock.advance(11.0)
    meter.observe(1, 1, 0.05)  # too few recent passes to override the profile
    assert meter.tokens_per_second == pytest.approx(profile.tokens_per_second)


def test_meter_ignores_empty_passes_and_prefills(fake_clock: FakeClock):
    meter = ThroughputMeter(PassProfile(0.01, 0.0), clock=fake_clock)
    for _ in range(MIN_SAMPLES * 2):
        meter.observe(0, 0, 1.0)
        meter.observe(1, 1, 0.0)
        meter.observe(1, 200, 1.0)
    assert meter.tokens_per_second == pytest.approx(100.0)


@pytest.mark.parametrize("span", [(0, 2), (2, 4)])
def test_profile_of_a_real_span(demo_model, span):
    from peer.model import BlockSpan

    profile = measure_pass_profile(BlockSpan.load(demo_model, *span), rounds=3)
    assert profile.fixed > 0 and profile.per_token >= 0
    assert profile.seconds(8) >= profile.seconds(1)
