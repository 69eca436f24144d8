"""Steady client load (tests.support.load.LoadClient) in a process of its own.

In the benchmark's process the client threads would compete for the GIL with what is being
measured (the rotation, the /proc sampling); a real registry's clients are elsewhere too.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench import procstat
from tests.support.load import LoadClient, LoadReport

# A rotation's window runs from its start to this long after it ended, so requests slowed by
# the new process's first moments still count as "during rotation" (as in bench/rotation.py).
WINDOW_TAIL = 0.1
SAMPLE_EVERY = 0.5


def _child(conn: Connection, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    load = LoadClient(*args, **kwargs).start()
    conn.send(time.monotonic() - load.elapsed())
    conn.recv()
    conn.send(load.stop())


class LoadProcess:
    """A LoadClient started in a spawned process; its time base is shared (CLOCK_MONOTONIC)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._proc = context.Process(target=_child, args=(child_conn, args, kwargs), daemon=True)
        self._proc.start()
        self.started_at = float(self._conn.recv())
        # The same instant on the wall clock, to place events from other processes' logs.
        self.started_wall = time.time() - (time.monotonic() - self.started_at)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def stop(self) -> LoadReport:
        self._conn.send("stop")
        report = self._conn.recv()
        self._proc.join(10)
        if not isinstance(report, LoadReport):
            raise RuntimeError(f"load process sent {report!r}")
        return report


@dataclass
class LoadTarget:
    port: int
    root_pem: bytes
    repo: str
    tag: str
    manifest_digest: str
    blob_digest: str


@dataclass
class LoadRun:
    label: str
    report: LoadReport
    windows: list[tuple[float, float]] = field(default_factory=list)
    events: int = 0  # rotations or renewals that happened during the run
    memory_peak: dict[str, procstat.Memory] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# What happens while the load runs: given the load (for its clock), returns the windows of
# disturbance in load-relative seconds and any notes. It must return when the run should end.
Scenario = Callable[[LoadProcess, "Sampler"], tuple[list[tuple[float, float]], list[str]]]


class Sampler:
    """Samples memory of process groups while the load runs (call ``tick`` often)."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]]) -> None:
        self.groups = groups
        self.peak: dict[str, procstat.Memory] = {}
        self._next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + SAMPLE_EVERY
        for name, pids in self.groups().items():
            mem = procstat.memory_sum(pids)
            old = self.peak.get(name, procstat.ZERO)
            self.peak[name] = procstat.Memory(
                max(old.rss, mem.rss), max(old.pss, mem.pss), max(old.uss, mem.uss)
            )

    def sleep_until(self, load: LoadProcess, at: float) -> None:
        """Sleep until load-relative time ``at``, sampling on the way."""
        while (left := at - load.elapsed()) > 0:
            self.tick()
            time.sleep(min(left, 0.05))


def run_load(
    label: str,
    target: LoadTarget,
    scenario: Scenario,
    groups: Callable[[], dict[str, list[int]]],
    *,
    max_duration: float,
) -> LoadRun:
    """Run ``scenario`` under steady load; CPU per group is taken over the whole run."""
    pids_before = groups()
    cpu_before = {name: procstat.cpu_snapshot(pids) for name, pids in pids_before.items()}
    load = LoadProcess(
        "registry.test",
        target.port,
        target.root_pem,
        target.repo,
        target.tag,
        manifest_digest=target.manifest_digest,
        blob_digest=target.blob_digest,
        max_duration=max_duration,
    )
    sampler = Sampler(groups)
    try:
        windows, notes = scenario(load, sampler)
    finally:
        report = load.stop()
    cpu_after = {name: procstat.cpu_snapshot(pids) for name, pids in groups().items()}
    cpu = {
        name: procstat.cpu_delta(cpu_before[name], cpu_after.get(name, {})) for name in cpu_before
    }
    return LoadRun(label, report, windows, len(windows), sampler.peak, cpu, notes)
