"""Login throttling with a fake clock."""

from __future__ import annotations

import pytest

from acme_registry.throttle import Limits, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fail(throttle: LoginThrottle, user: str, address: str, times: int) -> None:
    for _ in range(times):
        assert throttle.check(user, address) is None
        throttle.failed(user, address)


def test_five_failures_lock_the_pair_only(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "alice", "10.0.0.1", 4)
    assert throttle.check("alice", "10.0.0.1") is None
    throttle.failed("alice", "10.0.0.1")
    assert throttle.check("alice", "10.0.0.1") == 30
    # Neither the user elsewhere nor another user from the same address is locked.
    assert throttle.check("alice", "10.0.0.2") is None
    assert throttle.check("bob", "10.0.0.1") is None


def test_failures_spread_over_more_than_a_minute_do_not_lock(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    for _ in range(20):
        fail(throttle, "alice", "a", 1)
        clock.now += 15.1  # 4 per minute at most
    assert throttle.check("alice", "a") is None


def test_delay_grows_per_failure_up_to_fifteen_minutes(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "alice", "a", 5)
    seen = []
    for _ in range(8):
        wait = throttle.check("alice", "a")
        assert wait is not None
        seen.append(wait)
        clock.now += wait
        fail(throttle, "alice", "a", 1)
    assert seen == [30, 60, 120, 240, 480, 900, 900, 900]


def test_retry_after_counts_down(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "alice", "a", 5)
    clock.now += 29.5
    assert throttle.check("alice", "a") == 1
    clock.now += 0.5
    assert throttle.check("alice", "a") is None


def test_success_clears_the_pair(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "alice", "a", 4)
    throttle.succeeded("alice", "a")
    fail(throttle, "alice", "a", 4)
    assert throttle.check("alice", "a") is None


def test_pair_is_forgotten_after_quiet_time(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    fail(throttle, "alice", "a", 5)
    clock.now += 30 + 900
    assert throttle.check("alice", "a") is None
    fail(throttle, "alice", "a", 4)  # a fresh start: four free failures again
    assert throttle.check("alice", "a") is None


def test_address_spraying_names_is_capped_without_refusing_fresh_names(clock: Clock) -> None:
    throttle = LoginThrottle(clock=clock)
    for i in range(10):
        fail(throttle, f"user{i}", "nat", 1)
    assert throttle.capped("nat")
    # Capped: one failure now locks a pair.
    throttle.failed("user11", "nat")
    assert throttle.check("user11", "nat") == 30
    # A name without recent failures from there is still checked (never refused).
    assert throttle.check("carol", "nat") is None
    assert not throttle.capped("elsewhere")
    clock.now += 601
    assert not throttle.capped("nat")


def test_memory_is_bounded(clock: Clock) -> None:
    throttle = LoginThrottle(Limits(max_entries=100), clock=clock)
    for i in range(1000):
        throttle.failed(f"user{i}", f"10.0.{i // 250}.{i % 250}")
    assert len(throttle) <= 200
