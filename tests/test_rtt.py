"""The gateway's round trip to a peer: the least of the last few rounds, so pings that waited on a
loaded machine do not count, while a real change of the path shows within the window."""

from __future__ import annotations

import pytest

from common.peer_client import ChannelPool
from gateway.rtt import WINDOW_ROUNDS, RttTracker

A, B = "127.0.0.1:1", "127.0.0.1:2"


@pytest.fixture
def tracker() -> RttTracker:
    return RttTracker(ChannelPool())


def test_slow_rounds_do_not_move_the_figure(tracker):
    tracker.observe(A, 0.001)
    for slow in (0.004, 0.030, 0.002, 0.009):  # pings that waited behind passes and processes
        tracker.observe(A, slow)
        assert tracker.rtt[A] == 0.001
    # An exponentially weighted mean (weight 0.3, the earlier smoothing) would now read ~6.5 ms.


def test_a_drop_shows_at_once_and_a_rise_once_the_window_turns_over(tracker):
    tracker.observe(A, 0.010)
    tracker.observe(A, 0.002)
    assert tracker.rtt[A] == 0.002
    for round_ in range(WINDOW_ROUNDS):
        tracker.observe(A, 0.050)  # the path got longer for good
        assert tracker.rtt[A] == (0.002 if round_ < WINDOW_ROUNDS - 1 else 0.050)


def test_two_equal_replicas_agree_whatever_lands_on_which(tracker):
    noise = [0.0003, 0.004, 0.0011, 0.0002, 0.008, 0.0005]
    for i in range(20):
        tracker.observe(A, 0.0005 + noise[i % len(noise)])
        tracker.observe(B, 0.0005 + noise[(i + 3) % len(noise)])
    assert tracker.rtt[A] == pytest.approx(tracker.rtt[B])


def test_peers_that_left_are_forgotten_and_bad_windows_refused(tracker):
    tracker.observe(A, 0.001)
    tracker.observe(B, 0.002)
    tracker.forget({B})
    assert tracker.rtt == {B: 0.002}
    with pytest.raises(ValueError):
        RttTracker(ChannelPool(), window=0)
