import datetime as dt

import pytest

from acme_registry import schedule

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_ninety_day_certificate_renews_with_a_third_left():
    plan = schedule.lifetime_renewal(T0, T0 + dt.timedelta(days=90))
    assert plan.at == T0 + dt.timedelta(days=60)
    assert "third" in plan.reason


def test_short_lived_certificate_renews_at_half():
    plan = schedule.lifetime_renewal(T0, T0 + dt.timedelta(hours=160))
    assert plan.at == T0 + dt.timedelta(hours=80)
    assert "half" in plan.reason


def test_backoff_goes_1_10_100_minutes_then_daily():
    delays = [schedule.backoff_delay(n, have_certificate=True) for n in range(1, 6)]
    assert delays == [
        dt.timedelta(minutes=1),
        dt.timedelta(minutes=10),
        dt.timedelta(minutes=100),
        dt.timedelta(days=1),
        dt.timedelta(days=1),
    ]


def test_backoff_without_a_certificate_stays_at_100_minutes():
    assert schedule.backoff_delay(7, have_certificate=False) == dt.timedelta(minutes=100)


def test_next_attempt_honours_a_later_retry_after():
    later = T0 + dt.timedelta(hours=3)
    assert schedule.next_attempt(T0, 1, True, retry_after=later) == later
    assert schedule.next_attempt(T0, 1, True, retry_after=T0) == T0 + dt.timedelta(minutes=1)


NOW = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", NOW + dt.timedelta(seconds=120)),
        (" 0 ", NOW),
        ("Tue, 01 Dec 2026 12:00:00 GMT", dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)),
        # A date in another zone is the same instant, in UTC.
        ("Tue, 01 Dec 2026 13:00:00 +0100", dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_aware_utc(header, expected):
    when = schedule.retry_after_at(header, NOW)
    assert when == expected
    if when is not None:
        assert when.utcoffset() == dt.timedelta(0)


def test_retry_after_ignores_the_local_time_zone(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        local_now = NOW.astimezone()  # the same instant, in a zone five hours behind
        assert schedule.retry_after_at("60", local_now) == NOW + dt.timedelta(seconds=60)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_backoff_transitions():
    fresh = schedule.Backoff(config="c1")
    assert fresh.waiting_until(NOW) is None
    once = fresh.failed(NOW, "new order: boom", have_certificate=True)
    assert (once.failures, once.last_error, once.last_attempt) == (1, "new order: boom", NOW)
    assert once.waiting_until(NOW) == NOW + dt.timedelta(minutes=1)
    assert once.waiting_until(NOW + dt.timedelta(minutes=1)) is None
    twice = once.failed(NOW + dt.timedelta(minutes=1), "again", have_certificate=True)
    assert twice.failures == 2
    assert twice.next_attempt == NOW + dt.timedelta(minutes=11)
    # The CA's Retry-After wins when it is later.
    later = NOW + dt.timedelta(hours=5)
    limited = twice.failed(NOW, "rateLimited", have_certificate=True, retry_after=later)
    assert limited.next_attempt == later
    done = limited.succeeded(NOW)
    assert (done.failures, done.last_attempt, done.next_attempt) == (0, NOW, None)
    assert limited.started_over() == schedule.Backoff(config="c1")
    assert once == fresh.failed(NOW, "new order: boom", have_certificate=True)  # a value


def test_backoff_round_trip_and_a_changed_configuration_starts_over():
    backoff = schedule.Backoff(config="c1").failed(NOW, "x", have_certificate=False)
    stored = backoff.to_dict()
    assert stored == {
        "failures": 1,
        "last_attempt": NOW.isoformat(),
        "last_error": "x",
        "next_attempt": (NOW + dt.timedelta(minutes=1)).isoformat(),
        "config": "c1",
    }
    assert schedule.Backoff.from_dict(stored, "c1") == backoff
    assert schedule.Backoff.from_dict(stored, "c2") == schedule.Backoff(config="c2")
    assert schedule.Backoff.from_dict(None, "c1") == schedule.Backoff(config="c1")
    broken = {**stored, "next_attempt": "not a time"}
    assert schedule.Backoff.from_dict(broken, "c1") == schedule.Backoff(config="c1")
