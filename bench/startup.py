"""Comparisons 1 and 2: time to the first verified 200 on /v2/, cold and with a stored certificate.

Each round gives every path a fresh Pebble (not timed) and empty directories; the paths run
one after the other, in alternating order (A B C, then C B A), never at the same time.
"""

from __future__ import annotations

import datetime
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench.setups import CaddyProxy, CertbotRegistry, Ours, wait_for_v2
from tests.support.pebble import Pebble
from tests.support.ports import free_port

PATHS = ("ours", "caddy", "certbot")
TIMEOUT = 30.0
LOG_TAIL = 3000


class RoundFailed(Exception):
    """A round that did not reach serving, with the tail of the path's log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log[-LOG_TAIL:]


_SUPERVISOR_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO "
    r"(?P<what>supervisord started with pid|spawned: '(?P<name>[\w-]+)' with pid)",
    re.MULTILINE,
)
_REGISTRY_LISTENING = re.compile(r'^time="(?P<ts>[^"]+)" level=info msg="listening on', re.M)
_ISSUANCE_SUM = re.compile(r"^acme_registry_issuance_duration_seconds_sum\s+(\S+)", re.M)


def _supervisor_time(text: str) -> float:
    # supervisord logs local time with milliseconds.
    moment = datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")
    return moment.timestamp()


def _registry_time(text: str) -> float:
    # RFC 3339 with nanoseconds and Z: keep microseconds for datetime.
    head, _, frac = text.rstrip("Z").partition(".")
    moment = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return moment.timestamp() + float(f"0.{frac or '0'}")


def ours_breakdown(ours: Ours, first_200: float) -> dict[str, float]:
    """Where a cold start's time went, in seconds after launch (from logs and /metrics)."""
    log = ours.agent.log()
    marks: dict[str, float] = {}
    for match in _SUPERVISOR_LINE.finditer(log):
        if match["name"] is None:
            key = "supervisord started"
        elif match["name"] == "agent":
            key = "agent spawned"
        else:
            key = "registry spawned"
        marks.setdefault(key, _supervisor_time(match["ts"]) - ours.started_wall)
    if listening := _REGISTRY_LISTENING.search(log):
        marks["registry listening"] = _registry_time(listening["ts"]) - ours.started_wall
    marks["first verified 200"] = first_200
    try:
        metrics = requests.get(f"{ours.agent.admin_url}/metrics", timeout=5)
        if found := _ISSUANCE_SUM.search(metrics.text):
            marks["issuance (metric)"] = float(found.group(1))
    except requests.RequestException:
        pass
    return marks


def _ours_round(workdir: Path) -> dict[str, Any]:
    with Pebble(workdir / "pebble", free_port()) as pebble:
        ours = Ours(workdir / "ours", pebble, workdir / "storage")
        started = time.monotonic()
        ours.start()
        try:
            cold = wait_for_v2(ours.port, ours.root_pem, timeout=TIMEOUT) - started
            breakdown = ours_breakdown(ours, cold)
        except Exception as exc:
            raise RoundFailed(f"cold start: {exc}", ours.agent.log()) from exc
        finally:
            ours.stop()
        started = time.monotonic()
        ours.start()
        try:
            warm = wait_for_v2(ours.port, ours.root_pem, timeout=TIMEOUT) - started
            warm_breakdown = ours_breakdown(ours, warm)
        except Exception as exc:
            raise RoundFailed(f"stored-certificate start: {exc}", ours.agent.log()) from exc
        finally:
            ours.stop()
    return {"cold": cold, "warm": warm, "breakdown": breakdown, "warm_breakdown": warm_breakdown}


def _caddy_issuance(caddy: CaddyProxy) -> float | None:
    """Seconds from Caddy's "obtaining certificate" to "certificate obtained successfully"."""
    began = ended = None
    for event in caddy.log_events():
        ts = event.get("ts")
        if not isinstance(ts, float):
            continue
        if event.get("msg") == "obtaining certificate" and began is None:
            began = ts
        elif event.get("msg") == "certificate obtained successfully" and ended is None:
            ended = ts
    return ended - began if began is not None and ended is not None else None


def _caddy_round(workdir: Path) -> dict[str, Any]:
    with Pebble(workdir / "pebble", free_port()) as pebble:
        caddy = CaddyProxy(workdir / "caddy", pebble, workdir / "storage")
        started = time.monotonic()
        caddy.start()
        try:
            cold = wait_for_v2(caddy.port, caddy.root_pem, timeout=TIMEOUT) - started
            issue = _caddy_issuance(caddy)
        except Exception as exc:
            raise RoundFailed(f"cold start: {exc}", caddy.log_path.read_text()) from exc
        finally:
            caddy.stop()
        started = time.monotonic()
        caddy.start()
        try:
            warm = wait_for_v2(caddy.port, caddy.root_pem, timeout=TIMEOUT) - started
        except Exception as exc:
            raise RoundFailed(
                f"stored-certificate start: {exc}", caddy.log_path.read_text()
            ) from exc
        finally:
            caddy.stop()
    return {"cold": cold, "warm": warm, "issue": issue}


def _certbot_round(workdir: Path) -> dict[str, Any]:
    with Pebble(workdir / "pebble", free_port()) as pebble:
        certbot = CertbotRegistry(workdir / "certbot", pebble, workdir / "storage")
        started = time.monotonic()
        certbot.obtain()
        issue = time.monotonic() - started
        certbot.start()
        try:
            cold = wait_for_v2(certbot.port, certbot.root_pem, timeout=TIMEOUT) - started
        finally:
            certbot.stop()
        started = time.monotonic()
        certbot.start()
        try:
            warm = wait_for_v2(certbot.port, certbot.root_pem, timeout=TIMEOUT) - started
        finally:
            certbot.stop()
    return {"cold": cold, "warm": warm, "issue": issue}


ROUNDS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "ours": _ours_round,
    "caddy": _caddy_round,
    "certbot": _certbot_round,
}


def run(workdir: Path, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``rounds`` cold and stored-certificate starts of every path, alternating."""
    results: dict[str, dict[str, list[Any]]] = {path: {} for path in PATHS}
    errors: list[str] = []
    for index in range(rounds):
        order = PATHS if index % 2 == 0 else PATHS[::-1]
        for path in order:
            folder = workdir / f"startup-{index}-{path}"
            try:
                result = ROUNDS[path](folder)
            except Exception as exc:  # one failed round must not lose the others
                errors.append(f"round {index + 1}, {path}: {type(exc).__name__}: {exc}"[:500])
                log(f"  startup round {index + 1} {path}: FAILED {exc}")
                if isinstance(exc, RoundFailed):
                    log("    " + exc.log.replace("\n", "\n    "))
                continue
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            for key, value in result.items():
                results[path].setdefault(key, []).append(value)
            log(
                f"  startup round {index + 1} {path}: cold {result['cold']:.3f} s, "
                f"stored certificate {result['warm']:.3f} s"
            )
    return {"rounds": rounds, "paths": results, "errors": errors}
