"""What clients see while the registry is rotated to a new certificate, against the same load
without rotation.

One registry (the real binary, TLS, a pushed image with a 4 MB layer) and a steady load from
tests.support.load.LoadClient: new-connection and keep-alive manifest GETs plus full blob
downloads. First a run with no rotation, then one run with N rotations per rotation method.
Reported per run: refused connects (each retried once after 5 ms), requests still failed after
that retry, the longest time with no successful connect (overall, and overlapping a rotation),
and manifest-GET latency p50/p99 (overall, and for requests overlapping a rotation). The run
without rotation is measured over the same windows, so the "rot" columns compare like with
like.

Run: .venv/bin/python -m bench.rotation [N] [--interval S] [--method NAME ...] [--product]
     .venv/bin/python -m bench.rotation [N] --paths [--binary PATH ...]

``--product`` measures acme-registry itself: `acme-registry run` against Pebble, rotated by
`acme-registry renew` (an order, then the generation handover), with the same load.

``--paths`` compares the product's two rotation paths under 4 tight client loops (a new
TLS connection per manifest GET, no pause), as issue 9 measured them: the FIFO handover
(registry 2.x: the new generation binds once the old listener is gone) and socket activation
(3.x: every generation serves on the agent's one listening socket). One run per ``--binary``
(default: Debian's 2.8.2 and the 3.x stand-in of tests/support/standin_registry.py; add a
real 3.x binary to measure it), each under REGISTRY_SOCKET_ACTIVATION=auto. Reported:
*refused* connects and *unanswered* connections (accepted, then closed with no response
byte), each retried once after 5 ms, and requests still *failed* after that retry.

A rotation method is any ``rotate()`` callable that returns once the new generation serves
(see ``RotationTarget``); the manual ones here SIGTERM the registry themselves. To measure
the product instead, build a target whose ``rotate`` runs ``acme-registry renew`` and waits
for the new serial, and pass it to ``run_bench()`` next to (or instead of) the manual ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.support.clients import Skopeo
from tests.support.load import (
    RETRY_DELAY,
    LoadClient,
    LoadReport,
    RegistryServer,
    Rotation,
    image_digests,
)
from tests.support.oci import make_oci_image
from tests.support.ports import free_port

NAME = "registry.test"
REPO = "bench/rotation"
TAG = "v1"
REGISTRY_BINARY = "/usr/bin/docker-registry"
LAYER_BYTES = 4 * 1024 * 1024
WARMUP = 0.5  # seconds of load before the first rotation
# A rotation's window runs from the call to rotate() to this long after it returned, so
# requests slowed by the new generation's cold start still count as "during rotation".
WINDOW_TAIL = 0.1


@dataclass
class RotationTarget:
    """A served registry and how to rotate it.

    ``rotate`` must return once the new generation completes TLS handshakes, so that the
    window it spans covers the whole disturbance.
    """

    name: str
    port: int
    root_pem: bytes
    repo: str
    tag: str
    manifest_digest: str | None  # None: not checked (a stand-in answers every GET with {})
    blob_digest: str | None  # None: no blob downloads
    rotate: Callable[[], object]


@dataclass
class Run:
    label: str
    report: LoadReport
    windows: list[tuple[float, float]] = field(default_factory=list)
    rotations: list[object] = field(default_factory=list)


STANDIN = Path(__file__).resolve().parents[1] / "tests" / "support" / "standin_registry.py"
# The load of --paths: issue 9's "4 tight client loops (new connection per request)".
TIGHT_LOOPS = {"connect_workers": 4, "keepalive_workers": 0, "pause": 0.0}


def _load_child(conn: Connection, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Runs in the load process: start, report the time base, stop on request, send report."""
    load = LoadClient(*args, **kwargs).start()
    conn.send(time.monotonic() - load.elapsed())
    conn.recv()
    conn.send(load.stop())


class _LoadProcess:
    """A LoadClient in its own process.

    In the rotating process its threads would compete for the GIL with the rotation itself
    (polling the listener, spawning the next generation) and stretch the very window being
    measured; the real agent is a separate process from its clients too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._proc = context.Process(target=_load_child, args=(child_conn, args, kwargs))
        self._proc.start()
        # CLOCK_MONOTONIC is system-wide: both processes share the time base.
        self._started_at = float(self._conn.recv())

    def elapsed(self) -> float:
        return time.monotonic() - self._started_at

    def stop(self) -> LoadReport:
        self._conn.send("stop")
        report = self._conn.recv()
        self._proc.join(10)
        assert isinstance(report, LoadReport)
        return report


def measure(
    target: RotationTarget,
    label: str,
    rotations: int,
    interval: float,
    *,
    rotate: bool = True,
    retry_delay: float = RETRY_DELAY,
    load_options: dict[str, Any] | None = None,
) -> Run:
    """Steady load for WARMUP + rotations * interval seconds, rotating every ``interval``.

    With ``rotate=False`` the same schedule runs without rotating: the baseline.
    """
    load = _LoadProcess(
        target.name,
        target.port,
        target.root_pem,
        target.repo,
        target.tag,
        manifest_digest=target.manifest_digest,
        blob_digest=target.blob_digest,
        max_duration=WARMUP + rotations * interval + 60,
        retry_delay=retry_delay,
        **(load_options or {}),
    )
    windows: list[tuple[float, float]] = []
    results: list[object] = []
    try:
        next_at = WARMUP
        for _ in range(rotations):
            time.sleep(max(0.0, next_at - load.elapsed()))
            start = load.elapsed()
            if rotate:
                results.append(target.rotate())
            windows.append((start, load.elapsed() + WINDOW_TAIL))
            next_at += interval
        time.sleep(max(0.0, next_at - load.elapsed()))
    finally:
        report = load.stop()
    return Run(label, report, windows, results)


def manual_target(
    registry: RegistryServer, image: dict[str, str], prestart: bool
) -> RotationTarget:
    return RotationTarget(
        name=registry.name,
        port=registry.port,
        root_pem=registry.root_pem,
        repo=REPO,
        tag=TAG,
        manifest_digest=image["manifest"],
        blob_digest=image["blob"],
        rotate=lambda: registry.rotate(prestart=prestart),
    )


# The manual rotations: prestart or not (see RegistryServer.rotate).
METHODS = {"start-after-close": False, "prestart-fifo": True}


def run_bench(
    targets: dict[str, RotationTarget],
    rotations: int,
    interval: float,
    retry_delay: float = RETRY_DELAY,
) -> tuple[Run, list[Run]]:
    """The baseline (the first target's registry, not rotated), then each target rotated.

    All targets must serve the same registry, so the baseline applies to each of them.
    """
    first = next(iter(targets.values()))
    baseline = measure(
        first, "no rotation", rotations, interval, rotate=False, retry_delay=retry_delay
    )
    runs = [
        measure(target, label, rotations, interval, retry_delay=retry_delay)
        for label, target in targets.items()
    ]
    return baseline, runs


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: no sample


def table(baseline: Run, runs: Sequence[Run]) -> str:
    header = (
        "run",
        "rotations",
        "requests",
        "refused",
        "unanswered",
        "failed",
        "gap max ms",
        "gap rot ms",
        "p50 ms",
        "p99 ms",
        "p99 rot ms",
        "blob p99 ms",
    )
    rows = [header]
    for run in [baseline, *runs]:
        r = run.report
        # The baseline has no windows of its own: measure it over the first rotated run's,
        # which fall at the same points of the same schedule.
        windows = run.windows if run.rotations or not runs else runs[0].windows
        rows.append(
            (
                run.label,
                str(len(run.rotations)),
                str(r.requests),
                str(r.refused_connects),
                str(r.unanswered),
                str(r.failed),
                _fmt(r.longest_gap_ms),
                _fmt(r.longest_gap_overlapping(windows)),
                _fmt(r.p50_ms),
                _fmt(r.p99_ms),
                _fmt(r.latency_overlapping(99, windows)),
                _fmt(r.blob_p99_ms),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _rotation_timings(run: Run) -> str:
    rotations = [r for r in run.rotations if isinstance(r, Rotation)]
    if not rotations:
        return ""

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.1f}"

    return (
        f"{run.label}: median ms from SIGTERM: listener gone "
        f"{median([r.listener_gone_ms for r in rotations])}, new one listening "
        f"{median([r.spawned_ms for r in rotations])}, serving "
        f"{median([r.serving_ms for r in rotations])}; bind retries "
        f"{sum(r.bind_retries for r in rotations)}"
    )


@contextlib.contextmanager
def _renewed_product(
    workdir: Path, binary: Path, layer_bytes: int | None
) -> Iterator[tuple[Any, bytes, str, list[str], Callable[[], object]]]:
    """`acme-registry run` (AUTH_MODE=none) against its own Pebble, with an image pushed when
    ``layer_bytes`` is set: (agent, Pebble's root, manifest digest, layer digests, rotate),
    where ``rotate`` runs `acme-registry renew` and returns once a new serial is served."""
    from tests.support.agent import start_agent
    from tests.support.clients import wait_for_tls
    from tests.support.pebble import Pebble

    pebble = Pebble(workdir / "pebble", free_port(), nonce_reject=0).start()
    try:
        agent = start_agent(workdir, pebble, binary, auth=False)
    except BaseException:
        pebble.stop()
        raise
    try:
        root = pebble.root_pem()
        served = {wait_for_tls("127.0.0.1", agent.registry_port, NAME, root, 30).serial_number}
        manifest, layers = "", []
        if layer_bytes is not None:
            layout = workdir / "image"
            make_oci_image(layout, tag=TAG, size=layer_bytes)
            manifest, layers = image_digests(layout, TAG)
            Skopeo(workdir / "skopeo", root, [NAME]).push(
                layout, TAG, f"{NAME}:{agent.registry_port}/{REPO}:{TAG}"
            )

        def rotate() -> object:
            result = agent.cli("renew", timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"renew failed: {result.stderr.strip()}")
            cert = wait_for_tls(
                "127.0.0.1",
                agent.registry_port,
                NAME,
                root,
                10,
                accept=lambda c: c.serial_number not in served,
            )
            served.add(cert.serial_number)
            return cert.serial_number

        yield agent, root, manifest, layers, rotate
    finally:
        agent.stop()
        pebble.stop()


def product_bench(
    workdir: Path, rotations: int, interval: float, retry_delay: float
) -> tuple[Run, list[Run]]:
    """The product itself: `acme-registry run` against Pebble, rotated by `acme-registry renew`."""
    with _renewed_product(workdir, Path(REGISTRY_BINARY), LAYER_BYTES) as product:
        agent, root, manifest, layers, rotate = product
        target = RotationTarget(
            name=NAME,
            port=agent.registry_port,
            root_pem=root,
            repo=REPO,
            tag=TAG,
            manifest_digest=manifest,
            blob_digest=layers[0],
            rotate=rotate,
        )
        return run_bench({"acme-registry renew": target}, rotations, interval, retry_delay)


# Debian's 2.8 takes the FIFO path (today's only path); the stand-in takes socket activation.
DEFAULT_PATH_BINARIES = [Path(REGISTRY_BINARY), STANDIN]


@dataclass
class PathRun:
    """One rotation path measured through the product."""

    path: str  # "FIFO" or "socket activation", as the agent chose it
    binary: str
    version: str
    run: Run
    rotation_log: list[str]

    def result(self) -> dict[str, Any]:
        """JSON for bench's results (the lead's report integrates it)."""
        r = self.run.report
        return {
            "path": self.path,
            "binary": self.binary,
            "version": self.version,
            "rotations": len(self.run.rotations),
            "requests": r.requests,
            "refused": r.refused_connects,
            "unanswered": r.unanswered,
            "failed": r.failed,
            "gap_windows_ms": r.longest_gap_overlapping(self.run.windows),
            "p99_windows_ms": r.latency_overlapping(99, self.run.windows),
            "failures": r.failures[:5],
        }


def path_bench(workdir: Path, binary: Path, rotations: int, interval: float) -> PathRun:
    """The product with ``binary`` (REGISTRY_SOCKET_ACTIVATION=auto, AUTH_MODE=none), rotated
    ``rotations`` times by `acme-registry renew` under 4 tight client loops."""
    from acme_registry.activation import binary_version, parse_version

    version = parse_version(binary_version(str(binary)))
    # The stand-in answers every GET with {}: nothing to push.
    standin = Path(binary).resolve() == Path(STANDIN).resolve()
    with _renewed_product(workdir, binary, None if standin else 64 * 1024) as product:
        agent, root, manifest, _, rotate = product
        target = RotationTarget(
            name=NAME,
            port=agent.registry_port,
            root_pem=root,
            repo=REPO,
            tag=TAG,
            manifest_digest=manifest or None,
            blob_digest=None,
            rotate=rotate,
        )
        run = measure(target, str(binary), rotations, interval, load_options=TIGHT_LOOPS)
    log = agent.log()
    shared = "share the agent's listening socket" in log
    return PathRun(
        path="socket activation" if shared else "FIFO",
        binary=str(binary),
        version=version.describe() if version else "unknown",
        run=run,
        rotation_log=[line for line in log.splitlines() if "replaced registry:" in line],
    )


def paths_table(runs: Sequence[PathRun]) -> str:
    header = (
        "path",
        "registry",
        "rotations",
        "requests",
        "refused",
        "unanswered",
        "failed",
        "gap rot ms",
        "p99 rot ms",
    )
    rows = [header]
    for path_run in runs:
        result = path_run.result()
        rows.append(
            (
                path_run.path,
                path_run.version,
                str(result["rotations"]),
                str(result["requests"]),
                str(result["refused"]),
                str(result["unanswered"]),
                str(result["failed"]),
                _fmt(result["gap_windows_ms"]),
                _fmt(result["p99_windows_ms"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rotation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("rotations", nargs="?", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between rotations")
    parser.add_argument(
        "--retry-delay",
        type=float,
        default=RETRY_DELAY * 1000,
        help="ms before the one retry of a refused connect (default %(default)s)",
    )
    parser.add_argument(
        "--method", action="append", choices=sorted(METHODS), help="default: all of them"
    )
    parser.add_argument(
        "--product",
        action="store_true",
        help="rotate the product (acme-registry run + renew against Pebble) instead",
    )
    parser.add_argument(
        "--paths",
        action="store_true",
        help="the product's FIFO and socket-activation paths under 4 tight client loops",
    )
    parser.add_argument(
        "--binary",
        action="append",
        type=Path,
        help=f"with --paths: a registry binary (default: {REGISTRY_BINARY} and the stand-in)",
    )
    parser.add_argument("--json", type=Path, help="with --paths: also write the results here")
    args = parser.parse_args(argv)
    methods = args.method or list(METHODS)
    if args.paths:
        path_runs = []
        for binary in args.binary or DEFAULT_PATH_BINARIES:
            with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
                path_runs.append(path_bench(Path(tmp), binary, args.rotations, args.interval))
        print(paths_table(path_runs))
        for path_run in path_runs:
            for failure in path_run.run.report.failures[:3]:
                print(f"{path_run.path} ({path_run.version}): {failure}")
        if args.json:
            args.json.write_text(json.dumps([p.result() for p in path_runs], indent=2))
        return 0
    if args.product:
        with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
            baseline, runs = product_bench(
                Path(tmp), args.rotations, args.interval, args.retry_delay / 1000
            )
        print(table(baseline, runs))
        return 0

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
        workdir = Path(tmp)
        layout = workdir / "image"
        make_oci_image(layout, tag=TAG, size=LAYER_BYTES)
        manifest, layers = image_digests(layout, TAG)
        image = {"manifest": manifest, "blob": layers[0]}
        with RegistryServer(
            workdir / "registry", free_port(), name=NAME, binary=REGISTRY_BINARY
        ) as registry:
            skopeo = Skopeo(workdir / "skopeo", registry.root_pem, [NAME])
            skopeo.push(layout, TAG, f"{NAME}:{registry.port}/{REPO}:{TAG}")
            targets = {m: manual_target(registry, image, METHODS[m]) for m in methods}
            baseline, runs = run_bench(
                targets, args.rotations, args.interval, args.retry_delay / 1000
            )
            exit_codes = registry.stop()

    print(table(baseline, runs))
    print()
    for run in runs:
        if timings := _rotation_timings(run):
            print(timings)
    undrained = [code for code in exit_codes if code != 0]
    print(f"generations: {len(exit_codes)}, not exiting 0 after SIGTERM: {len(undrained)}")
    load_after = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (other work on the machine widens every window)"
    )
    for run in [baseline, *runs]:
        if run.report.failures:
            print(f"{run.label} failures (first 3): {run.report.failures[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
