"""Port 80 under idle connections: answers and memory of ``acme-registry run`` (issue 9).

For each count N (0, 1000, 10000 by default) it holds N TCP connections to the agent's port 80
that each sent half a request line (tests/support/holders.py, from a child process), and
meanwhile times ~20 challenge GETs (a pending token: 200) and ~20 plain GETs (301), each on a
new connection, and reads the memory of every process of the run except the registry's.
The timed GETs start once the server has accepted every held connection; one challenge GET
made right after the connects (while the server still sets them up) is reported apart.

The same is measured on a baseline: the agent's code of an older commit (``--baseline``,
default the commit before the asyncio responder), unpacked with ``git archive`` into a
temporary directory and put first on PYTHONPATH; nothing else changes.

Run: ``.venv/bin/python -m bench.port80 [--counts 0 1000 10000] [--requests 20]``. It prints a
table and writes the results as JSON (``--json``, default bench/results/port80.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from acme_registry.challenges import PendingChallenges
from acme_registry.storage import FileStorage
from bench import procstat
from bench.setups import NAME, Ours, wait_for_v2
from tests.support.holders import IdleClients, raise_own_file_limit
from tests.support.pebble import Pebble
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[1]
BASELINE = "8c0524e"  # the thread-per-connection responder with its 256-connection cap
COUNTS = (0, 1000, 10_000)
HALF_REQUEST = b"GET /.well-known/acme-chall"
TOKEN = "bench-port80-token_0123456789abcdefghijklmnopq"
KEY_AUTHORIZATION = TOKEN + ".thumbprint"
ANSWER_TIMEOUT = 5.0
MIB = 1024 * 1024

Log = Callable[[str], None]


def _timed_get(port: int, path: str) -> tuple[float | None, str]:
    """Seconds from connect to the whole answer, with its status, or None and what failed."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Host": NAME})
        response = conn.getresponse()
        response.read()
        return time.monotonic() - started, str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        return None, type(exc).__name__
    finally:
        conn.close()


def _answers(port: int, path: str, expected: int, count: int) -> dict[str, Any]:
    times: list[float] = []
    outcomes: dict[str, int] = {}
    for _ in range(count):
        seconds, outcome = _timed_get(port, path)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if seconds is not None and outcome == str(expected):
            times.append(seconds)
    return {
        "requests": count,
        "answered": len(times),
        "outcomes": outcomes,
        "median": statistics.median(times) if times else None,
        "max": max(times) if times else None,
    }


def _accept_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the listener on ``port`` (ss)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def _wait_accepted(port: int, timeout: float = 60.0) -> float:
    """Seconds until the server has accepted every connection made so far."""
    started = time.monotonic()
    while _accept_queue(port) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def _memory(ours: Ours) -> dict[str, int]:
    total = procstat.memory_sum(ours.added_pids())
    return {"rss": total.rss, "pss": total.pss, "uss": total.uss}


def _one_count(ours: Ours, port: int, count: int, requests: int) -> dict[str, Any]:
    clients = IdleClients("127.0.0.1", port, count, HALF_REQUEST) if count else None
    try:
        held = clients.start() if clients else None
        # Right after the burst the server is still setting up the connections it accepted.
        burst = _answers(port, f"/.well-known/acme-challenge/{TOKEN}", 200, 1)
        # The rest is measured with the connections held: accepted by the server (none left
        # in the kernel's accept queue) and a second for the event loop to catch up.
        catch_up = _wait_accepted(port)
        time.sleep(1.0)
        memory = _memory(ours)
        challenge = _answers(port, f"/.well-known/acme-challenge/{TOKEN}", 200, requests)
        redirect = _answers(port, "/v2/", 301, requests)
        # Still held once the answers are in: none of them was closed to make room.
        after = clients.status() if clients else None
        memory_after = _memory(ours)
    finally:
        if clients:
            clients.stop()
    return {
        "count": count,
        "connected": held.connected if held else 0,
        "connect_seconds": held.connect_seconds if held else 0.0,
        "accept_catch_up_seconds": catch_up,
        "held_after": after.open if after else 0,
        "closed_by_server": after.closed if after else 0,
        "challenge": challenge,
        "first_after_burst": burst["median"],
        "redirect": redirect,
        "memory": {k: max(memory[k], memory_after[k]) for k in memory},
    }


def measure_variant(
    workdir: Path,
    label: str,
    counts: Sequence[int],
    requests: int,
    log: Log,
    pythonpath: Path | None = None,
) -> dict[str, Any]:
    """One ``acme-registry run`` (its code from ``pythonpath`` when given) through ``counts``."""
    with Pebble(workdir / "pebble", free_port()) as pebble:
        ours = Ours(workdir / "ours", pebble, workdir / "storage")
        if pythonpath is not None:
            ours.agent.env["PYTHONPATH"] = str(pythonpath)
        ours.start()
        try:
            wait_for_v2(ours.port, ours.root_pem, timeout=60)
            PendingChallenges(FileStorage(ours.agent.data_dir)).add(TOKEN, KEY_AUTHORIZATION)
            rows = []
            for count in counts:
                row = _one_count(ours, pebble.http_port, count, requests)
                log(f"{label}: {_row_text(row)}")
                rows.append(row)
                # The server's side of the dropped connections goes away before the next count.
                time.sleep(2)
        finally:
            ours.stop()
    return {"label": label, "rows": rows}


def _unpack_baseline(commit: str, into: Path) -> Path:
    """The agent's code (src/ and entrypoint/) of ``commit``, unpacked into ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, "src", "entrypoint"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run(
    workdir: Path,
    log: Log = print,
    counts: Sequence[int] = COUNTS,
    requests: int = 20,
    baseline: str | None = BASELINE,
) -> dict[str, Any]:
    """Every count on this checkout, then on ``baseline`` (None: no baseline)."""
    # This process holds nothing itself, but the holder child inherits the soft limit.
    raise_own_file_limit(max(counts, default=0) + 1024)
    results: dict[str, Any] = {"counts": list(counts), "requests": requests, "variants": []}
    results["variants"].append(
        measure_variant(workdir / "current", "asyncio (this checkout)", counts, requests, log)
    )
    if baseline:
        code = _unpack_baseline(baseline, workdir / "baseline-code")
        results["variants"].append(
            measure_variant(
                workdir / "baseline", f"threads ({baseline})", counts, requests, log, code
            )
        )
    return results


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _answer_cell(answers: dict[str, Any]) -> str:
    return (
        f"{answers['answered']}/{answers['requests']}, "
        f"{_ms(answers['median'])} / {_ms(answers['max'])}"
    )


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['count']} idle: held {row['held_after']}, challenge {_answer_cell(row['challenge'])}"
        f", redirect {_answer_cell(row['redirect'])}, "
        f"RSS {row['memory']['rss'] / MIB:.1f} MiB, PSS {row['memory']['pss'] / MIB:.1f} MiB"
    )


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per responder and count)."""
    lines = [
        "| responder | idle connections | still held after | challenge 200 (answered, "
        "median / max) | redirect 301 (answered, median / max) | first 200 right after the "
        "connects | agent RSS | agent PSS |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for variant in results["variants"]:
        for row in variant["rows"]:
            lines.append(
                f"| {variant['label']} | {row['count']} | {row['held_after']} | "
                f"{_answer_cell(row['challenge'])} | {_answer_cell(row['redirect'])} | "
                f"{_ms(row['first_after_burst'])} | "
                f"{row['memory']['rss'] / MIB:.1f} MiB | {row['memory']['pss'] / MIB:.1f} MiB |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.port80", description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--requests", type=int, default=20, help="GETs of each kind per count")
    parser.add_argument("--baseline", default=BASELINE, help="commit of the baseline agent")
    parser.add_argument("--no-baseline", action="store_true", help="this checkout only")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "port80.json")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    workdir = Path(tempfile.mkdtemp(prefix="bench-port80-"))
    try:
        results = run(
            workdir,
            counts=args.counts,
            requests=args.requests,
            baseline=None if args.no_baseline else args.baseline,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["command"] = " ".join([".venv/bin/python -m bench.port80", *map(shlex.quote, raw)])
    print()
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
