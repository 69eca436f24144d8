"""``python -m bench``: acme-registry against Caddy, certbot and the bare registry (issue 6).

Sets up everything on loopback (Pebble, the registry binary, Caddy, certbot, skopeo, curl),
runs the comparisons side by side, and writes docs/benchmarks.md with PNG charts in docs/.
The raw numbers go to a JSON file (``--json``); ``--from-json`` renders the report again
without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import (
    auth_pull,
    auth_rate,
    datapath,
    dns,
    gc_collect,
    machine,
    port80,
    renewals,
    report,
    rotation,
    startup,
)

REPO = Path(__file__).resolve().parents[1]
# Every part, in the order a full run measures them; `--only` picks among them.
PARTS = (
    "startup",
    "data",
    "renewal",
    "port80",
    "rotation_paths",
    "dns",
    "auth",
    "gc",
    "replicas",
)
REQUIRED = ("caddy", "certbot", "docker-registry", "pebble", "skopeo", "curl", "unshare", "named")


def _log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="acme-registry against Caddy, certbot and the bare registry (issue 6); "
        "writes docs/benchmarks.md and docs/bench-*.png",
    )
    parser.add_argument("--rounds", type=int, default=9, help="cold/stored starts per path")
    parser.add_argument(
        "--data-rounds", type=int, default=15, help="blob GETs per path and protocol"
    )
    parser.add_argument("--skopeo-rounds", type=int, default=5, help="skopeo push+pull per path")
    parser.add_argument("--blob-mb", type=int, default=512, help="size of the GET test blob")
    parser.add_argument("--skopeo-mb", type=int, default=16, help="layer size of the skopeo image")
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        help="load without renewal, per path (default: renewals x interval, the same schedule)",
    )
    parser.add_argument("--renewals", type=int, default=10, help="acme-registry renew under load")
    parser.add_argument("--renew-interval", type=float, default=3.0, help="seconds between them")
    parser.add_argument("--caddy-renewals", type=int, default=3, help="Caddy renewals to wait for")
    parser.add_argument(
        "--caddy-validity",
        type=int,
        default=120,
        help="lifetime (s) of Caddy's short certificates (renewed with a third left)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="run only these parts (repeatable); default all",
    )
    parser.add_argument(
        "--rotation-binary",
        action="append",
        default=[],
        help="registry binaries for the rotation-paths part (default: Debian's 2.8 and the "
        "3.x stand-in; add a 3.x binary to measure the real one)",
    )
    parser.add_argument(
        "--dns-rounds",
        type=int,
        default=5,
        help="cold starts per path in the dns part (certbot's default path sleeps 60 s each)",
    )
    parser.add_argument(
        "--auth-binary",
        action="append",
        default=[],
        help="registry binaries for the auth part (default: Debian's 2.8; repeat to add a 3.x)",
    )
    parser.add_argument(
        "--auth-seconds", type=float, default=5.0, help="seconds per auth mode and round"
    )
    parser.add_argument("--auth-rounds", type=int, default=6, help="rate rounds per auth mode")
    parser.add_argument("--pull-rounds", type=int, default=5, help="docker pulls per auth mode")
    parser.add_argument(
        "--pull-layer-kib", type=int, default=1024, help="size of each of the 10 layers pulled"
    )
    parser.add_argument(
        "--gc-binary",
        action="append",
        default=[],
        help="registry binaries for the gc part (default: Debian's 2.8; add a 3.x binary)",
    )
    parser.add_argument(
        "--gc-tags",
        type=int,
        default=10,
        help="gc part: tags pushed (the htpasswd run pushes them with one bcrypt per request:"
        " 21 of 40 tags took 12 min on 2 busy cores)",
    )
    parser.add_argument(
        "--cold-starts", type=int, default=2, help="replicas: cold starts of 3 replicas at once"
    )
    parser.add_argument(
        "--replica-renewals", type=int, default=5, help="replicas: renewals under load"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=120, help="replicas: idle window for S3 requests"
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, small blob: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--charts", type=Path, default=REPO / "docs", help="PNG directory")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="render the report from saved results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.data_rounds, args.skopeo_rounds, args.dns_rounds = 3, 3, 3, 3
        args.blob_mb, args.renewals, args.caddy_renewals, args.caddy_validity = 64, 3, 1, 30
        args.auth_seconds, args.auth_rounds, args.pull_rounds = 3.0, 1, 1
        args.gc_tags = 10
        args.cold_starts, args.replica_renewals, args.idle_seconds = 1, 2, 30
    if args.baseline_seconds is None:
        args.baseline_seconds = args.renewals * args.renew_interval
    for name in ("rounds", "data_rounds", "skopeo_rounds", "dns_rounds"):
        if getattr(args, name) < 3 and not args.from_json:
            parser.error(f"--{name.replace('_', '-')} must be at least 3")
    return args


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if "dns" in (args.only or ["dns"]) and not dns.certbot_plugin_installed():
        missing.append("python3-certbot-dns-rfc2136")
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (apt-get install caddy certbot ...)")
    parts = args.only or list(PARTS)
    results: dict[str, Any] = {"machine": machine.describe(), "command": command, "errors": []}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}

    def attempt(name: str, step: Callable[[], Any]) -> None:
        """Run one part; a failure is logged and reported, and the other parts still run."""
        try:
            results[name] = step()
        except Exception as exc:
            _log(f"{name}: FAILED\n{traceback.format_exc()}")
            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}"[:1000])

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="acme-registry-bench-"))
    try:
        if "startup" in parts:
            _log(f"startup: {args.rounds} rounds of ours / Caddy / certbot")
            attempt("startup", lambda: startup.run(workdir, args.rounds, _log))
        if "data" in parts or "renewal" in parts:
            _log(f"data path: {args.blob_mb} MB blob, every path up on one storage")
            with datapath.Fleet(workdir / "fleet", args.blob_mb * 1024 * 1024) as fleet:
                time.sleep(2)  # let start-up work settle before the idle sample
                attempt("memory_idle", lambda: datapath.idle_memory(fleet))
                if "data" in parts:
                    attempt(
                        "data",
                        lambda: datapath.run(
                            fleet, args.data_rounds, args.skopeo_rounds, args.skopeo_mb, _log
                        ),
                    )
                if "renewal" in parts:
                    _log("renewal under load")
                    attempt(
                        "renewal",
                        lambda: renewals.run(
                            fleet,
                            baseline_seconds=args.baseline_seconds,
                            ours_count=args.renewals,
                            ours_interval=args.renew_interval,
                            caddy_count=args.caddy_renewals,
                            caddy_validity=args.caddy_validity,
                            log=_log,
                        ),
                    )
                    time.sleep(2)
                    attempt("memory_after", lambda: datapath.idle_memory(fleet))
        if "port80" in parts:
            _log("port 80: idle half-request connections held, against the base commit")
            attempt("port80", lambda: port80.run(workdir / "port80", _log))
        if "rotation_paths" in parts:
            binaries = [Path(p) for p in args.rotation_binary] or rotation.DEFAULT_PATH_BINARIES
            _log(f"rotation paths: {args.renewals} renewals per binary under tight loops")
            attempt(
                "rotation_paths",
                lambda: [
                    rotation.path_bench(
                        workdir / f"paths-{i}", binary, args.renewals, args.renew_interval
                    ).result()
                    for i, binary in enumerate(binaries)
                ],
            )
        if "dns" in parts:
            _log(f"dns: {args.dns_rounds} rounds of http-01 / dns-01 / certbot's rfc2136 plugin")
            attempt("dns", lambda: dns.run(workdir / "dns", args.dns_rounds, _log))
        if "auth" in parts:
            binaries = [Path(p) for p in args.auth_binary] or [auth_rate.REGISTRY_BINARY]
            _log("auth: manifest GET rate and docker pull per authentication mode")
            attempt("auth", lambda: _auth_part(workdir / "auth", binaries, args))
        if "gc" in parts:
            binaries = [Path(p) for p in args.gc_binary] or [Path("/usr/bin/docker-registry")]
            _log(f"gc: {args.gc_tags} tags through acme-registry run, pulls before and during")
            # The default (htpasswd) and AUTH_MODE=none side by side, for every binary.
            attempt(
                "gc",
                lambda: [
                    gc_collect.agent_run(
                        workdir / f"gc-{i}-{auth}", binary, tags=args.gc_tags, auth=auth, log=_log
                    )
                    for i, binary in enumerate(binaries)
                    for auth in (True, False)
                ],
            )
        if "replicas" in parts:
            _log("replicas: 3 replicas behind haproxy on one S3 bucket")
            attempt("replicas", lambda: _replicas(args, workdir / "replicas"))
    except Exception as exc:  # setting up the shared paths failed: report what there is
        _log(f"setup: FAILED\n{traceback.format_exc()}")
        results["errors"].append(f"setup of the shared paths: {type(exc).__name__}: {exc}"[:1000])
    finally:
        if args.keep:
            _log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    results["load_after"] = os.getloadavg()[0]
    return results


def _auth_part(workdir: Path, binaries: list[Path], args: argparse.Namespace) -> list[Any]:
    """Per registry binary: every auth mode up side by side, the rate, then docker pulls
    (one Docker engine of the bench's own for all of them)."""
    from tests.support.docker import remove_workdir, temporary_engine
    from tests.support.tokenauth import NAME

    runs = []
    # Servers and curl clients on separate cores, every mode alike (bench.auth_rate.Pinning).
    pinning = auth_rate.Pinning.split()
    _log(f"  auth: {pinning.describe() if pinning else 'not pinned (one core)'}")
    engine, engine_dir = temporary_engine([NAME])
    try:
        with engine:
            for index, binary in enumerate(binaries):
                with auth_rate.AuthPaths(workdir / f"paths-{index}", binary, pinning) as paths:
                    connections = 4
                    samples = auth_rate.run(
                        paths, args.auth_seconds, args.auth_rounds, connections, _log
                    )
                    layer_bytes = args.pull_layer_kib * 1024
                    pulls = auth_pull.run(engine, paths, args.pull_rounds, layer_bytes, _log)
                    runs.append(
                        {
                            "version": paths.version,
                            "binary": str(binary),
                            "connections": connections,
                            "seconds": args.auth_seconds,
                            "pinning": pinning.describe() if pinning else None,
                            "rates": {m: [x.rate for x in v] for m, v in samples.items()},
                            "server_cpu_us": {
                                m: [x.server_us for x in v] for m, v in samples.items()
                            },
                            "client_cpu_us": {
                                m: [x.client_us for x in v] for m, v in samples.items()
                            },
                            "layers": auth_pull.LAYERS,
                            "layer_bytes": layer_bytes,
                            "pulls": pulls,
                        }
                    )
    finally:
        remove_workdir(engine_dir)
    return runs


def _replicas(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    # Imported only here: it needs boto3 and SeaweedFS, which the other parts do not.
    from bench import replicas

    return replicas.run(
        workdir,
        _log,
        cold_starts=args.cold_starts,
        renewals=args.replica_renewals,
        idle_seconds=args.idle_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        command = " ".join([".venv/bin/python -m bench", *map(shlex.quote, raw)])
        results = measure(args, command)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    written = report.write(results, args.out, args.charts)
    for path in written:
        _log(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if results.get("errors"):
        _log("parts failed: " + "; ".join(results["errors"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
