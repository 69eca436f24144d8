"""RETENTION_*/GC_* settings and the GC schedule arithmetic (UTC only: no DST to handle)."""

from __future__ import annotations

import datetime as dt

import pytest

from acme_registry.config import ConfigError
from acme_registry.gcconfig import (
    DEFAULT_TIMEOUT,
    KNOWN_GC_VARIABLES,
    Pattern,
    load_gc_settings,
    next_run,
    parse_schedule,
    unknown_gc_variable,
)

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_nothing_set_means_off():
    s = load_gc_settings({})
    assert not s.retention.enabled
    assert not s.schedule.enabled
    assert s.timeout == DEFAULT_TIMEOUT == dt.timedelta(minutes=30)


def test_a_keep_rule_turns_the_daily_schedule_on():
    s = load_gc_settings({"RETENTION_KEEP_LAST": "5", "RETENTION_PROTECT": "latest, v*"})
    assert s.retention.keep_last == 5 and s.retention.keep_days is None
    assert s.retention.protect == (Pattern("latest"), Pattern("v*"))
    assert s.schedule.kind == "daily" and s.schedule.minute_of_day == 3 * 60 + 30
    assert s.retention.applies_to("any/deep/repo")


def test_schedule_off_stays_off_with_retention():
    s = load_gc_settings({"RETENTION_KEEP_DAYS": "30", "GC_SCHEDULE": "off"})
    assert s.retention.keep_days == 30
    assert not s.schedule.enabled


def test_schedule_alone_collects_without_retention():
    s = load_gc_settings({"GC_SCHEDULE": "weekly@sun 04:00", "GC_TIMEOUT": "90s"})
    assert not s.retention.enabled and s.schedule.enabled
    assert s.timeout == dt.timedelta(seconds=90)


def test_patterns_star_crosses_slashes():
    assert Pattern("team/*").matches("team/a/b")
    assert Pattern("*-cache").matches("ci/build-cache")
    assert not Pattern("team/*").matches("other/team/a")
    assert Pattern("v*").matches("v1.2.3") and not Pattern("v*").matches("latest")
    assert Pattern("1.*.0").matches("1.2.0") and not Pattern("1.*.0").matches("1.2.1")
    # Regex metacharacters in a tag are literal.
    assert not Pattern("v1.0").matches("v1x0")


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        ({"RETENTION_KEEP_LAST": "0"}, "RETENTION_KEEP_LAST", "at least 1"),
        ({"RETENTION_KEEP_LAST": "-3"}, "RETENTION_KEEP_LAST", "whole number"),
        ({"RETENTION_KEEP_LAST": "five"}, "RETENTION_KEEP_LAST", "whole number"),
        ({"RETENTION_KEEP_DAYS": "1.5"}, "RETENTION_KEEP_DAYS", "whole number"),
        ({"RETENTION_KEEP_DAYS": "0"}, "RETENTION_KEEP_DAYS", "at least 1"),
        (
            {"RETENTION_KEEP_LAST": "3", "RETENTION_PROTECT": "latest,,v*"},
            "RETENTION_PROTECT",
            "empty pattern",
        ),
        (
            {"RETENTION_KEEP_LAST": "3", "RETENTION_PROTECT": "rel/*"},
            "RETENTION_PROTECT",
            "not a tag pattern",
        ),
        (
            {"RETENTION_KEEP_LAST": "3", "RETENTION_REPOSITORIES": "Team/*"},
            "RETENTION_REPOSITORIES",
            "not a repository pattern",
        ),
        (
            {"RETENTION_KEEP_LAST": "3", "RETENTION_REPOSITORIES": "ci/[ab]"},
            "RETENTION_REPOSITORIES",
            "not a repository pattern",
        ),
        ({"RETENTION_PROTECT": "latest"}, "RETENTION_PROTECT", "no effect"),
        ({"RETENTION_REPOSITORIES": "ci/*"}, "RETENTION_REPOSITORIES", "no effect"),
        ({"RETENTION_KEEP": "5"}, "RETENTION_KEEP", "unknown setting"),
        ({"GC_SCHEDULES": "off"}, "GC_SCHEDULES", "unknown setting"),
        ({"GC_SCHEDULE": "nightly"}, "GC_SCHEDULE", "expected off"),
        ({"GC_SCHEDULE": "25:00"}, "GC_SCHEDULE", "not a time of day"),
        ({"GC_SCHEDULE": "daily@3:61"}, "GC_SCHEDULE", "not a time of day"),
        ({"GC_SCHEDULE": "daily@0330"}, "GC_SCHEDULE", "expected off"),
        ({"GC_SCHEDULE": "weekly@sunday 03:30"}, "GC_SCHEDULE", "the day must be"),
        ({"GC_SCHEDULE": "weekly@sun"}, "GC_SCHEDULE", "HH:MM"),
        ({"GC_SCHEDULE": "every 0h"}, "GC_SCHEDULE", "longer than zero"),
        ({"GC_SCHEDULE": "every 6d"}, "GC_SCHEDULE", "expected off"),
        ({"GC_SCHEDULE": "every 200h"}, "GC_SCHEDULE", "up to a week"),
        ({"GC_SCHEDULE": "0 3 * * *"}, "GC_SCHEDULE", "expected off"),
        ({"GC_TIMEOUT": "0"}, "GC_TIMEOUT", "longer than zero"),
        ({"GC_TIMEOUT": "1d"}, "GC_TIMEOUT", "expected N"),
        ({"GC_TIMEOUT": "-5m"}, "GC_TIMEOUT", "expected N"),
    ],
)
def test_bad_input_names_the_variable(env, variable, words):
    with pytest.raises(ConfigError) as error:
        load_gc_settings(env)
    assert error.value.variable == variable
    assert words in error.value.problem
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{variable}: ")


def test_unknown_check_skips_service_links_and_other_prefixes():
    env = {
        "GC_PORT": "tcp://10.0.0.7:80",  # a Kubernetes Service named "gc"
        "GC_SERVICE_HOST": "10.0.0.7",
        "ACME_DOMAINS": "x",
        "RETENTION_KEEP_LAST": "2",
    }
    assert unknown_gc_variable(env) is None
    assert unknown_gc_variable({"GC_PORT": "80"}) == "GC_PORT"
    assert set(KNOWN_GC_VARIABLES) >= {"RETENTION_KEEP_LAST", "GC_SCHEDULE", "GC_TIMEOUT"}


def test_schedule_forms_normalise():
    assert parse_schedule("03:30") == parse_schedule("daily@03:30")
    assert parse_schedule(" Weekly@SUN   3:05 ").weekday == 6
    assert parse_schedule("every 6h").interval == dt.timedelta(hours=6)
    assert parse_schedule("every 30 m").interval == dt.timedelta(minutes=30)
    assert parse_schedule("every 10s").interval == dt.timedelta(seconds=10)


def test_next_run_daily():
    s = parse_schedule("daily@03:30")
    assert next_run(s, at("2026-12-01T01:00:00")) == at("2026-12-01T03:30:00")
    assert next_run(s, at("2026-12-01T03:30:00")) == at("2026-12-02T03:30:00")  # strictly after
    assert next_run(s, at("2026-12-31T23:59:59")) == at("2027-01-01T03:30:00")


def test_next_run_daily_from_another_timezone():
    s = parse_schedule("00:15")
    tokyo = dt.timezone(dt.timedelta(hours=9))
    # 08:00 in Tokyo is 23:00 UTC the day before.
    after = dt.datetime(2026, 12, 2, 8, 0, tzinfo=tokyo)
    assert next_run(s, after) == at("2026-12-02T00:15:00")


def test_next_run_weekly():
    s = parse_schedule("weekly@sun 03:30")
    # 2026-12-01 is a Tuesday.
    assert next_run(s, at("2026-12-01T10:00:00")) == at("2026-12-06T03:30:00")
    assert next_run(s, at("2026-12-06T03:29:59")) == at("2026-12-06T03:30:00")
    assert next_run(s, at("2026-12-06T03:30:00")) == at("2026-12-13T03:30:00")
    assert next_run(parse_schedule("weekly@tue 11:00"), at("2026-12-01T10:00:00")) == at(
        "2026-12-01T11:00:00"
    )


def test_next_run_every_is_aligned_to_the_epoch():
    s = parse_schedule("every 6h")
    assert next_run(s, at("2026-12-01T05:59:59")) == at("2026-12-01T06:00:00")
    assert next_run(s, at("2026-12-01T06:00:00")) == at("2026-12-01T12:00:00")
    assert next_run(s, at("2026-12-01T23:00:00")) == at("2026-12-02T00:00:00")
    quick = parse_schedule("every 10s")
    assert next_run(quick, at("2026-12-01T00:00:05.5")) == at("2026-12-01T00:00:10")


def test_next_run_off_and_naive():
    assert next_run(parse_schedule("off"), at("2026-12-01T00:00:00")) is None
    with pytest.raises(ValueError):
        next_run(parse_schedule("03:30"), dt.datetime(2026, 12, 1))


@pytest.mark.parametrize(
    ("value", "shared"),
    [(None, None), ("", None), ("file", None), (" File ", None), ("s3", "s3"), ("redis", "redis")],
)
def test_a_state_store_other_than_file_is_shared(value, shared):
    env = {"RETENTION_KEEP_LAST": "3"} if value is None else {"STATE_STORE": value}
    assert load_gc_settings(env).shared_state_store == shared
