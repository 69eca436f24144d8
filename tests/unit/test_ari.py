import dataclasses
import datetime as dt
import random

import pytest

from acme_registry import ari, certinfo
from tests.support.vectors import RFC_CERT

# RFC 9773, Appendix A, and the CertID worked out in section 4.1.
NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def test_cert_id_matches_the_rfc_example():
    (cert,) = certinfo.load_pem_chain(RFC_CERT)
    assert ari.cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_cert_id_needs_an_authority_key_identifier():
    (cert,) = certinfo.load_pem_chain(RFC_CERT)
    with pytest.raises(ValueError, match="Authority Key Identifier"):
        ari.cert_id(dataclasses.replace(cert, authority_key_id=None))


def test_parse_the_rfc_response():
    body = (
        b'{"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"},'
        b' "explanationURL": "https://acme.example.com/docs/ari"}'
    )
    info = ari.parse(body, "21600", NOW)
    assert info.start == dt.datetime(2025, 1, 2, 4, tzinfo=dt.UTC)
    assert info.end == dt.datetime(2025, 1, 3, 4, tzinfo=dt.UTC)
    assert info.explanation_url == "https://acme.example.com/docs/ari"
    assert info.recheck_after == dt.timedelta(hours=6)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"suggestedWindow": {"start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z"}}',
        b'{"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-02T04:00:00Z"}}',
        b'{"suggestedWindow": {"start": "yesterday", "end": "2025-01-02T04:00:00Z"}}',
    ],
)
def test_invalid_windows_are_errors(body):
    with pytest.raises(ValueError):
        ari.parse(body, "60", NOW)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, dt.timedelta(hours=6)),
        ("5", dt.timedelta(minutes=1)),
        ("3600", dt.timedelta(hours=1)),
        ("172800", dt.timedelta(hours=12)),
        ("Wed, 01 Jan 2025 02:00:00 GMT", dt.timedelta(hours=2)),
        ("garbage", dt.timedelta(hours=6)),
    ],
)
def test_recheck_delay_is_clamped(header, expected):
    assert ari.recheck_delay(header, NOW) == expected


def test_chosen_instant_is_inside_the_window_and_spread():
    info = ari.RenewalInfo(NOW, NOW + dt.timedelta(hours=10), None, dt.timedelta(hours=6))
    rng = random.Random(7)
    picks = [ari.choose_instant(info, rng) for _ in range(200)]
    assert all(info.start <= p <= info.end for p in picks)
    assert max(picks) - min(picks) > dt.timedelta(hours=8)


def test_a_window_that_reaches_expiry_keeps_room_for_the_order():
    # A short-lived profile's window (as Pebble's: its last minute) ending at expiry.
    expires = NOW + dt.timedelta(minutes=2)
    info = ari.RenewalInfo(expires - dt.timedelta(minutes=1), expires, None, dt.timedelta(0))
    rng = random.Random(3)
    picks = [ari.choose_instant(info, rng, expires=expires) for _ in range(200)]
    assert all(info.start <= p <= expires - dt.timedelta(seconds=30) for p in picks)
    # A long certificate's window ends days before expiry: untouched, ORDER_ROOM elsewhere.
    long_expiry = NOW + dt.timedelta(days=90)
    week = ari.RenewalInfo(NOW, NOW + dt.timedelta(days=7), None, dt.timedelta(hours=6))
    picks = [ari.choose_instant(week, rng, expires=long_expiry) for _ in range(200)]
    assert max(picks) - min(picks) > dt.timedelta(days=6)
    near = ari.RenewalInfo(NOW, long_expiry, None, dt.timedelta(hours=6))
    assert all(
        ari.choose_instant(near, rng, expires=long_expiry) <= long_expiry - ari.ORDER_ROOM
        for _ in range(50)
    )
    # A window that starts after expiry (the CA is late): its start, at once.
    late = ari.RenewalInfo(
        expires + dt.timedelta(minutes=1), expires + dt.timedelta(hours=1), None, dt.timedelta(0)
    )
    assert ari.choose_instant(late, rng, expires=expires) == late.start
