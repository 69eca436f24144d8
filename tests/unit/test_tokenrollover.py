"""When the keyring makes its next key and when the next key may sign (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from acme_registry.tokenrollover import (
    NO_GRACE,
    KeyringTimes,
    next_key_due,
    parse_keyring_times,
    switch_due,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def test_defaults_leave_the_old_key_trusted_long_after_the_switch() -> None:
    times = KeyringTimes()
    assert times.lifetime == 365 * DAY and times.lead == 30 * DAY and times.grace == 7 * DAY
    # The grace is far longer than the longest poll interval (STATE_POLL_INTERVAL <= 60 s).
    assert times.grace / dt.timedelta(seconds=60) >= 10_000
    assert times.single() == KeyringTimes(365 * DAY, 30 * DAY, NO_GRACE)


def test_next_key_is_due_lead_before_expiry() -> None:
    times = KeyringTimes()
    expiry = NOW + 40 * DAY
    assert not next_key_due(NOW, expiry, times)
    assert next_key_due(expiry - times.lead, expiry, times)


def test_switch_waits_for_this_registry_and_for_the_grace() -> None:
    grace = 7 * DAY
    published = NOW
    # Published but not yet trusted by this replica's registry: never.
    assert not switch_due(NOW + 30 * DAY, next_since=published, served_here=False, grace=grace)
    # Trusted here, but the other replicas may not have followed yet.
    assert not switch_due(NOW + 6 * DAY, next_since=published, served_here=True, grace=grace)
    assert switch_due(NOW + grace, next_since=published, served_here=True, grace=grace)
    # One instance: as soon as its registry trusts the next key.
    assert switch_due(NOW, next_since=published, served_here=True, grace=NO_GRACE)


def test_parse_keyring_times() -> None:
    times = parse_keyring_times("90,60,15")
    assert times == KeyringTimes(
        dt.timedelta(seconds=90), dt.timedelta(seconds=60), dt.timedelta(seconds=15)
    )


@pytest.mark.parametrize("text", ["", "90,60", "a,b,c", "60,90,15", "90,60,60", "90,60,-1"])
def test_bad_keyring_times(text: str) -> None:
    with pytest.raises(ValueError):
        parse_keyring_times(text)
