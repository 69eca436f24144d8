"""Retention and garbage-collection settings from the environment, and the GC schedule (pure).

Variables (all optional; retention is off until a KEEP rule is set):

``RETENTION_KEEP_LAST=N``
    keep the N most recently pushed tags of each repository (N >= 1), not counting protected
    tags and cosign signature/attestation tags. 0 is refused: "keep none" would delete every
    unprotected tag; leave the variable unset to keep any number.
``RETENTION_KEEP_DAYS=D``
    keep tags pushed within the last D days (D >= 1, whole days).
``RETENTION_PROTECT=PATTERN[,PATTERN...]``
    tags never removed (e.g. ``latest,v*``).
``RETENTION_REPOSITORIES=PATTERN[,PATTERN...]``
    the repositories retention applies to (default ``*``: all).
``GC_SCHEDULE``
    when a run (retention, then collection) starts, always in UTC (no daylight saving time
    to handle). Off by default, ``daily@03:30`` by default once a KEEP rule is set. Forms::

        off                     never on its own (`acme-registry gc` still runs one)
        HH:MM | daily@HH:MM     every day at HH:MM UTC
        weekly@DAY HH:MM        every week, DAY one of mon tue wed thu fri sat sun
        every N{s,m,h}          every N seconds/minutes/hours, aligned to multiples of the
                                interval since 1970-01-01T00:00Z (so `every 6h` runs at
                                00:00, 06:00, 12:00, 18:00 and a restart does not shift it)
``GC_TIMEOUT``
    the longest a whole run (retention's API deletes, then the read-only window) may take:
    ``N{s,m,h}`` or plain seconds; default ``30m``. Past it the run stops where it is
    (deletes not made yet stay for the next run) and the registry serves read-write.

Patterns: ``*`` matches any run of characters, ``/`` included (``team/*`` matches
``team/a/b``); every other character matches itself. Tag patterns may use the characters of a
tag (``A-Z a-z 0-9 _ . -``), repository patterns those of a repository name (lowercase
``a-z 0-9 . _ - /``). A pattern that could never match (an empty one, an uppercase
repository) is a configuration error rather than a rule that silently does nothing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .config import ConfigError, is_service_link

KNOWN_GC_VARIABLES = (
    "RETENTION_KEEP_LAST",
    "RETENTION_KEEP_DAYS",
    "RETENTION_PROTECT",
    "RETENTION_REPOSITORIES",
    "GC_SCHEDULE",
    "GC_TIMEOUT",
)
GC_VARIABLE_PREFIXES = ("RETENTION_", "GC_")

DEFAULT_SCHEDULE = "daily@03:30"
DEFAULT_TIMEOUT = dt.timedelta(minutes=30)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNITS = {"s": 1, "m": 60, "h": 3600}
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_.*-]{1,128}")
_REPOSITORY_PATTERN = re.compile(r"[a-z0-9._/*-]{1,255}")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")
_INTERVAL = re.compile(r"(\d+)\s*([smh])")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Pattern:
    """A glob where ``*`` matches anything, ``/`` included."""

    text: str

    def matches(self, name: str) -> bool:
        regex = ".*".join(re.escape(part) for part in self.text.split("*"))
        return re.fullmatch(regex, name, re.DOTALL) is not None


@dataclass(frozen=True)
class Schedule:
    """When runs start. ``kind`` is ``off``, ``daily``, ``weekly`` or ``every``."""

    kind: str
    minute_of_day: int = 0  # daily and weekly: minutes after 00:00 UTC
    weekday: int = 0  # weekly: 0 is Monday, as datetime.weekday()
    interval: dt.timedelta = dt.timedelta(0)  # every
    text: str = "off"

    @property
    def enabled(self) -> bool:
        return self.kind != "off"


@dataclass(frozen=True)
class RetentionRules:
    keep_last: int | None = None
    keep_days: int | None = None
    protect: tuple[Pattern, ...] = ()
    repositories: tuple[Pattern, ...] = (Pattern("*"),)

    @property
    def enabled(self) -> bool:
        """Whether any tag can ever be selected: only the KEEP rules remove anything."""
        return self.keep_last is not None or self.keep_days is not None

    def applies_to(self, repository: str) -> bool:
        return any(p.matches(repository) for p in self.repositories)

    def protects(self, tag: str) -> bool:
        return any(p.matches(tag) for p in self.protect)


@dataclass(frozen=True)
class GcSettings:
    retention: RetentionRules
    schedule: Schedule
    timeout: dt.timedelta = DEFAULT_TIMEOUT
    # STATE_STORE when it is shared by several replicas (anything but ``file``): then a
    # collection is refused, since every replica would have to be read-only first.
    shared_state_store: str | None = None


def shared_state_store(env: Mapping[str, str]) -> str | None:
    """STATE_STORE's raw value when it names a store replicas share, else None.

    Read here as it is (the state store's own settings are validated elsewhere): whatever
    shared backend it names, one replica cannot make the others read-only.
    """
    value = env.get("STATE_STORE", "").strip()
    return None if value.lower() in ("", "file") else value


def unknown_gc_variable(env: Mapping[str, str]) -> str | None:
    """The first RETENTION_*/GC_* name that is not ours (Kubernetes Service links aside)."""
    for name in sorted(env):
        if not name.startswith(GC_VARIABLE_PREFIXES) or name in KNOWN_GC_VARIABLES:
            continue
        if not is_service_link(name, env[name]):
            return name
    return None


def load_gc_settings(env: Mapping[str, str]) -> GcSettings:
    """Validate the RETENTION_*/GC_* variables, or raise :class:`ConfigError` naming one."""
    unknown = unknown_gc_variable(env)
    if unknown is not None:
        raise ConfigError(unknown, f"unknown setting (known: {', '.join(KNOWN_GC_VARIABLES)})")
    retention = RetentionRules(
        keep_last=_count(env, "RETENTION_KEEP_LAST"),
        keep_days=_count(env, "RETENTION_KEEP_DAYS"),
        protect=_patterns(env, "RETENTION_PROTECT", _TAG_PATTERN, "tag"),
        repositories=_patterns(env, "RETENTION_REPOSITORIES", _REPOSITORY_PATTERN, "repository")
        or (Pattern("*"),),
    )
    if not retention.enabled:
        for name in ("RETENTION_PROTECT", "RETENTION_REPOSITORIES"):
            if env.get(name, "").strip():
                raise ConfigError(
                    name, "has no effect without RETENTION_KEEP_LAST or RETENTION_KEEP_DAYS"
                )
    raw_schedule = env.get("GC_SCHEDULE", "").strip()
    if not raw_schedule:
        raw_schedule = DEFAULT_SCHEDULE if retention.enabled else "off"
    timeout = _duration("GC_TIMEOUT", env.get("GC_TIMEOUT", "").strip())
    return GcSettings(
        retention=retention,
        schedule=parse_schedule(raw_schedule),
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        shared_state_store=shared_state_store(env),
    )


def parse_schedule(raw: str, variable: str = "GC_SCHEDULE") -> Schedule:
    """Parse one of the documented forms (see the module docstring)."""
    text = " ".join(raw.strip().lower().split())
    expected = "expected off, HH:MM, daily@HH:MM, weekly@DAY HH:MM or every N{s,m,h}"
    if text == "off":
        return Schedule("off")
    if text.startswith("every "):
        match = _INTERVAL.fullmatch(text.removeprefix("every "))
        if match is None:
            raise ConfigError(variable, f"{raw!r}: {expected}")
        seconds = int(match[1]) * _UNITS[match[2]]
        if seconds <= 0:
            raise ConfigError(variable, f"{raw!r}: the interval must be longer than zero")
        if seconds > 7 * 86400:
            raise ConfigError(variable, f"{raw!r}: intervals up to a week; use weekly@DAY HH:MM")
        return Schedule(
            "every", interval=dt.timedelta(seconds=seconds), text=f"every {match[1]}{match[2]}"
        )
    if text.startswith("weekly@"):
        day, _, clock = text.removeprefix("weekly@").partition(" ")
        if day not in WEEKDAYS:
            raise ConfigError(variable, f"{raw!r}: the day must be one of {' '.join(WEEKDAYS)}")
        minute = _clock(variable, raw, clock)
        return Schedule(
            "weekly",
            minute_of_day=minute,
            weekday=WEEKDAYS.index(day),
            text=f"weekly@{day} {minute // 60:02d}:{minute % 60:02d}",
        )
    clock = text.removeprefix("daily@")
    if _CLOCK.fullmatch(clock) is None:
        raise ConfigError(variable, f"{raw!r}: {expected}")
    minute = _clock(variable, raw, clock)
    return Schedule(
        "daily", minute_of_day=minute, text=f"daily@{minute // 60:02d}:{minute % 60:02d}"
    )


def next_run(schedule: Schedule, after: dt.datetime) -> dt.datetime | None:
    """The first scheduled instant strictly later than ``after`` (UTC), or None when off.

    ``after`` must be timezone-aware; the answer is in UTC. Strictly later, so calling it
    again with the instant a run started gives the following run, never the same one.
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    after = after.astimezone(dt.UTC)
    if schedule.kind == "off":
        return None
    if schedule.kind == "every":
        step = schedule.interval
        periods = (after - _EPOCH) // step
        return _EPOCH + (periods + 1) * step
    midnight = after.replace(hour=0, minute=0, second=0, microsecond=0)
    candidate = midnight + dt.timedelta(minutes=schedule.minute_of_day)
    if schedule.kind == "daily":
        return candidate if candidate > after else candidate + dt.timedelta(days=1)
    days_ahead = (schedule.weekday - candidate.weekday()) % 7
    candidate += dt.timedelta(days=days_ahead)
    return candidate if candidate > after else candidate + dt.timedelta(days=7)


def _clock(variable: str, raw: str, clock: str) -> int:
    match = _CLOCK.fullmatch(clock)
    if match is None:
        raise ConfigError(variable, f"{raw!r}: the time must be HH:MM (UTC)")
    hour, minute = int(match[1]), int(match[2])
    if hour > 23 or minute > 59:
        raise ConfigError(variable, f"{raw!r}: {clock} is not a time of day (00:00 to 23:59)")
    return hour * 60 + minute


def _count(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(name, f"{raw!r} is not a whole number")
    value = int(raw)
    if value < 1:
        raise ConfigError(name, "must be at least 1 (unset it to keep any number)")
    return value


def _patterns(
    env: Mapping[str, str], name: str, allowed: re.Pattern[str], what: str
) -> tuple[Pattern, ...]:
    raw = env.get(name, "")
    if not raw.strip():
        return ()
    patterns = []
    for item in raw.split(","):
        text = item.strip()
        if not text:
            raise ConfigError(name, "empty pattern in the list")
        if allowed.fullmatch(text) is None:
            raise ConfigError(
                name, f"{text!r} is not a {what} pattern (characters of a {what} name and *)"
            )
        patterns.append(Pattern(text))
    return tuple(patterns)


def _duration(name: str, raw: str) -> dt.timedelta | None:
    if not raw:
        return None
    if raw.isdigit():
        seconds = int(raw)
    else:
        match = _INTERVAL.fullmatch(raw.lower())
        if match is None:
            raise ConfigError(name, f"{raw!r}: expected N{{s,m,h}} or seconds, e.g. 30m")
        seconds = int(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise ConfigError(name, "must be longer than zero")
    return dt.timedelta(seconds=seconds)
