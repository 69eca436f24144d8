"""Comparison 4 (and memory under load): what clients see while the certificate is renewed.

The same steady load (tests.support.load.LoadClient: new-connection and keep-alive manifest
GETs plus 4 MB blob downloads, each checked by digest) runs four times, alternating:

1. ours without renewal, 2. Caddy without renewal (its certificate is valid for years),
3. ours renewed N times with ``acme-registry renew`` (order, then registry rotation),
4. Caddy on a Pebble 2.10 whose only profile gives short certificates, renewing on its own
   schedule (``renew_interval 1s``; certmagic renews with a third of the lifetime left).

Memory and CPU of every process group are sampled during each run.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procstat
from bench.datapath import LOAD_REPO, LOAD_TAG, Fleet, Served
from bench.loadrun import WINDOW_TAIL, LoadProcess, LoadRun, LoadTarget, Sampler, Scenario, run_load
from bench.setups import CaddyProxy, Ours, wait_for_v2
from tests.support.pebble import Pebble, pebble_sid_binary
from tests.support.ports import free_port

WARMUP = 0.5
_ROTATION_LINE = re.compile(
    r"registry generation \S+ replaced \S+: new process ready (?P<ready>[\d.]+) ms, "
    r"stop request (?P<stop>[\d.]+) ms, old listener gone (?P<gone>[\d.]+) ms later, "
    r"config handed over (?P<handed>[\d.]+) ms later"
)


def steady(duration: float) -> Scenario:
    def scenario(
        load: LoadProcess, sampler: Sampler
    ) -> tuple[list[tuple[float, float]], list[str]]:
        sampler.sleep_until(load, WARMUP + duration)
        return [], []

    return scenario


def ours_renewals(ours: Ours, count: int, interval: float, took: list[float]) -> Scenario:
    """``acme-registry renew`` every ``interval`` s: a new order, then a registry rotation."""

    def scenario(
        load: LoadProcess, sampler: Sampler
    ) -> tuple[list[tuple[float, float]], list[str]]:
        windows: list[tuple[float, float]] = []
        notes: list[str] = []
        for index in range(count):
            sampler.sleep_until(load, WARMUP + index * interval)
            start = load.elapsed()
            result = ours.agent.cli("renew", timeout=120)
            end = load.elapsed()
            took.append(end - start)
            if result.returncode != 0:
                notes.append(f"renew {index + 1} exited {result.returncode}: {result.stderr[:200]}")
            windows.append((start, end + WINDOW_TAIL))
        sampler.sleep_until(load, WARMUP + count * interval)
        return windows, notes

    return scenario


def caddy_renewal_spans(caddy: CaddyProxy, since_wall: float) -> list[tuple[float, float]]:
    """(start, end) wall times of Caddy's renewals after ``since_wall``, from its JSON log.

    From "attempting certificate renewal" to "replaced certificate in cache" (the moment new
    handshakes get the new certificate).
    """
    spans: list[tuple[float, float]] = []
    began: float | None = None
    for event in caddy.log_events():
        ts = event.get("ts")
        if not isinstance(ts, float) or ts < since_wall:
            continue
        if event.get("msg") == "attempting certificate renewal" and began is None:
            began = ts
        elif event.get("msg") == "replaced certificate in cache" and began is not None:
            spans.append((began, ts))
            began = None
    return spans


def caddy_renewals(caddy: CaddyProxy, count: int, timeout: float) -> Scenario:
    """Wait (under load) until Caddy has renewed ``count`` times by itself."""

    def scenario(
        load: LoadProcess, sampler: Sampler
    ) -> tuple[list[tuple[float, float]], list[str]]:
        notes: list[str] = []
        deadline = load.elapsed() + timeout
        while len(spans := caddy_renewal_spans(caddy, load.started_wall)) < count:
            if load.elapsed() > deadline:
                notes.append(f"only {len(spans)} of {count} renewals within {timeout:.0f} s")
                break
            sampler.sleep_until(load, load.elapsed() + 0.25)
        sampler.sleep_until(load, load.elapsed() + 1.0)
        spans = caddy_renewal_spans(caddy, load.started_wall)
        windows = [(a - load.started_wall, b - load.started_wall + WINDOW_TAIL) for a, b in spans]
        return windows, notes

    return scenario


def _renew_then_set(ours: Ours, done: threading.Event) -> None:
    try:
        ours.agent.cli("renew", timeout=120)
    finally:
        done.set()


def renewal_memory(ours: Ours, count: int = 3, every: float = 0.02) -> dict[str, Any]:
    """Peak memory of what we add while ``acme-registry renew`` runs, at idle (no load).

    The order may run in a short-lived child; sampling every 20 ms catches it, which would
    disturb the rotation measurements, so this runs apart from them.
    """
    peak = {"rss": 0, "pss": 0, "uss": 0}
    names: list[dict[str, Any]] = []
    took: list[float] = []
    for _ in range(count):
        done = threading.Event()
        started = time.monotonic()

        threading.Thread(target=_renew_then_set, args=(ours, done), daemon=True).start()
        while not done.is_set():
            pids = ours.added_pids()
            per_process = {pid: procstat.memory(pid) for pid in pids}
            mem = sum(per_process.values(), procstat.ZERO)
            if mem.pss > peak["pss"]:
                names = [
                    {"name": procstat.exe_name(pid), "rss": m.rss, "pss": m.pss, "uss": m.uss}
                    for pid, m in per_process.items()
                ]
            peak = {
                "rss": max(peak["rss"], mem.rss),
                "pss": max(peak["pss"], mem.pss),
                "uss": max(peak["uss"], mem.uss),
            }
            done.wait(every)
        took.append(time.monotonic() - started)
        time.sleep(1.0)
    return {"peak": peak, "processes_at_peak": names, "renew_seconds": took}


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def summarize(run: LoadRun, path: str, kind: str) -> dict[str, Any]:
    r = run.report
    return {
        "label": run.label,
        "path": path,
        "kind": kind,
        "events": run.events,
        "duration": r.duration_s,
        "requests": r.requests,
        "failed": r.failed,
        "refused": r.refused_connects,
        "unanswered": r.unanswered,
        "p50": _nan_to_none(r.p50_ms),
        "p99": _nan_to_none(r.p99_ms),
        "p99_windows": _nan_to_none(r.latency_overlapping(99, run.windows))
        if run.windows
        else None,
        "gap_max": r.longest_gap_ms,
        "gap_windows": r.longest_gap_overlapping(run.windows) if run.windows else None,
        "blob_downloads": r.blob_downloads,
        "blob_p99": _nan_to_none(r.blob_p99_ms),
        "keepalive_reconnects": r.keepalive_reconnects,
        "failures": r.failures[:5],
        "cpu": run.cpu_seconds,
        "memory_peak": {
            g: {"rss": m.rss, "pss": m.pss, "uss": m.uss} for g, m in run.memory_peak.items()
        },
        "notes": run.notes,
    }


def _target(fleet: Fleet, served: Served) -> LoadTarget:
    return LoadTarget(
        served.port, served.root_pem, LOAD_REPO, LOAD_TAG, fleet.load_manifest, fleet.load_blob
    )


def run(
    fleet: Fleet,
    *,
    baseline_seconds: float,
    ours_count: int,
    ours_interval: float,
    caddy_count: int,
    caddy_validity: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    assert fleet.ours is not None
    ours = fleet.ours
    ours_path, caddy_path = fleet.paths["ours"], fleet.paths["caddy"]
    runs: list[dict[str, Any]] = []

    raw: dict[tuple[str, str], LoadRun] = {}

    def record(run_: LoadRun, path: str, kind: str) -> None:
        raw[path, kind] = run_
        runs.append(summarize(run_, path, kind))
        log(f"  {run_.label}: {run_.report.summary()}")
        for note in run_.notes:
            log(f"    note: {note}")

    margin = 60.0
    record(
        run_load(
            "acme-registry, no renewal",
            _target(fleet, ours_path),
            steady(baseline_seconds),
            ours_path.groups,
            max_duration=baseline_seconds + margin,
        ),
        "ours",
        "baseline",
    )
    record(
        run_load(
            "Caddy, no renewal",
            _target(fleet, caddy_path),
            steady(baseline_seconds),
            caddy_path.groups,
            max_duration=baseline_seconds + margin,
        ),
        "caddy",
        "baseline",
    )

    renew_took: list[float] = []
    log_before = len(_ROTATION_LINE.findall(ours.agent.log()))
    record(
        run_load(
            f"acme-registry, {ours_count} x acme-registry renew",
            _target(fleet, ours_path),
            ours_renewals(ours, ours_count, ours_interval, renew_took),
            ours_path.groups,
            max_duration=ours_count * (ours_interval + 30) + margin,
        ),
        "ours",
        "renewal",
    )
    rotations = [
        {k: float(v) for k, v in m.groupdict().items()}
        for m in _ROTATION_LINE.finditer(ours.agent.log())
    ][log_before:]
    runs[-1]["renew_seconds"] = renew_took
    runs[-1]["rotation_ms"] = rotations

    errors: list[str] = []
    try:
        caddy_run, spans = _caddy_short(fleet, caddy_count, caddy_validity, margin, log)
    except Exception as exc:  # e.g. Pebble 2.10 not installed: keep ours' runs
        errors.append(f"Caddy's renewals: {type(exc).__name__}: {exc}"[:1000])
        log(f"  Caddy's renewals: FAILED {exc}")
    else:
        record(caddy_run, "caddy", "renewal")
        runs[-1]["renewal_seconds"] = [b - a for a, b in spans]
    # Like for like (as bench/rotation.py does): the run without renewal measured over the
    # renewal run's windows. Ours renews on a fixed schedule from the start of its run, so
    # the same instants exist in its baseline; Caddy's renewals fall after its baseline ends.
    base, renewed = raw["ours", "baseline"], raw["ours", "renewal"]
    runs[0]["p99_windows"] = _nan_to_none(base.report.latency_overlapping(99, renewed.windows))
    runs[0]["gap_windows"] = base.report.longest_gap_overlapping(renewed.windows)
    log("  memory while acme-registry renew runs (idle, sampled every 20 ms)")
    memory = renewal_memory(ours)
    return {
        "memory_during_renewal": memory,
        "baseline_seconds": baseline_seconds,
        "ours_count": ours_count,
        "ours_interval": ours_interval,
        "caddy_count": caddy_count,
        "caddy_validity": caddy_validity,
        "runs": runs,
        "errors": errors,
    }


def _caddy_short(
    fleet: Fleet, count: int, validity: int, margin: float, log: Callable[[str], None]
) -> tuple[LoadRun, list[tuple[float, float]]]:
    """A second Caddy, on a Pebble 2.10 whose single profile issues ``validity``-s certs.

    Caddy 2.6 names no profile in its orders; Pebble then picks one at random among those
    configured, so only the short one is configured.
    """
    workdir: Path = fleet.workdir / "caddy-short"
    profiles = {"short": {"description": f"{validity} s", "validityPeriod": validity}}
    with Pebble(
        workdir / "pebble",
        free_port(),
        binary=pebble_sid_binary(),
        config_overrides={"profiles": profiles},
    ) as pebble:
        caddy = CaddyProxy(workdir, pebble, fleet.storage, renew_interval="1s").start()
        try:
            wait_for_v2(caddy.port, caddy.root_pem)
            started_wall = time.time()
            log(f"  Caddy with {validity}-s certificates serving; waiting for {count} renewals")
            target = LoadTarget(
                caddy.port,
                caddy.root_pem,
                LOAD_REPO,
                LOAD_TAG,
                fleet.load_manifest,
                fleet.load_blob,
            )
            timeout = count * validity + 30
            run_ = run_load(
                f"Caddy, {count} renewals of {validity}-s certificates",
                target,
                caddy_renewals(caddy, count, timeout),
                lambda: {"added": caddy.added_pids(), "registry": caddy.registry_pids()},
                max_duration=timeout + margin,
            )
            spans = caddy_renewal_spans(caddy, started_wall)
        finally:
            caddy.stop()
    return run_, spans
