"""Authenticated manifest GET rate: no auth, htpasswd (bcrypt cost 10 and 4), token mode.

Four registry processes (the Debian binary) share one storage directory holding a small
image; each serves TLS on loopback with the same configuration apart from ``auth``. Token
mode is the registry's ``auth.token`` with our token service (in this process) issuing the
token once; the registry then checks the ES256 signature on every request. The client is
``--connections`` curl processes, each one keep-alive HTTPS connection sending
``GET /v2/bench/app/manifests/v1`` as fast as it is answered, for ``--seconds`` per mode;
the modes run one after the other, ``--rounds`` times, in one run.

Run: .venv/bin/python -m bench.auth_rate [--seconds 10] [--rounds 2] [--connections 4]

The clients share the cores with the server, so absolute rates depend on the machine and
whatever else runs; the ratios against no auth, measured in one run, are the point.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import ssl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import bcrypt

from bench.setups import REGISTRY_BINARY, clean_env, registry_config, stop_process
from tests.support.clients import Skopeo
from tests.support.oci import MANIFEST_MEDIA_TYPE, make_oci_image
from tests.support.ports import free_ports
from tests.support.tls import TestCA
from tests.support.tokenauth import NAME, TokenStack

USER = "bench"
PASSWORD = "bench-Pa55word-for-the-rate-run"
REPOSITORY = "bench/app"
MODES = ("none", "htpasswd cost 10", "htpasswd cost 4", "token")


def measure(
    port: int, root_file: Path, header: str | None, seconds: float, connections: int
) -> tuple[float, int]:
    """(successful requests per second, failed requests) over ``connections`` clients.

    Each client is one curl process sending a million GETs (URL globbing) over one
    keep-alive connection, stopped after ``seconds``; curl's per-transfer status lines are
    the count (on stderr: unbuffered, so a SIGTERM loses none). curl is C: a Python client
    would be the bottleneck, not the registry.
    """
    url = f"https://127.0.0.1:{port}/v2/{REPOSITORY}/manifests/v1?n=[1-1000000]"
    command = [
        "curl", "-s", "--http1.1", "--cacert", str(root_file), "-o", "/dev/null",
        "-w", "%{stderr}%{http_code}\\n", "-H", f"Accept: {MANIFEST_MEDIA_TYPE}",
    ]  # fmt: skip
    if header:
        command += ["-H", f"Authorization: {header}"]
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(connections)]
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [*command, url], stdout=subprocess.DEVNULL, stderr=out, env=clean_env()
            )
            for out in outputs
        ]
        time.sleep(seconds)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        elapsed = time.monotonic() - started
        ok = failed = 0
        for out in outputs:
            out.seek(0)
            lines = out.read().decode().split("\n")[:-1]  # the last one may be cut off
            ok += lines.count("200")
            failed += len(lines) - lines.count("200")
    return ok / elapsed, failed


class _Registry:
    """The registry binary with ``auth`` (or none), TLS from the shared CA."""

    def __init__(
        self, workdir: Path, port: int, storage: Path, tls: Path, auth: dict[str, object] | None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = registry_config(port, storage, "bench-http-secret", tls)
        if auth is not None:
            config["auth"] = auth
        path = workdir / "registry.yml"
        path.write_text(json.dumps(config, indent=2))
        self.port = port
        self.log = workdir / "registry.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(REGISTRY_BINARY), "serve", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
            )

    def wait(self, root_pem: bytes, timeout: float = 20) -> None:
        context = ssl.create_default_context(cadata=root_pem.decode())
        deadline = time.monotonic() + timeout
        while True:
            try:
                https = http.client.HTTPSConnection("127.0.0.1", self.port, context=context)
                https.request("GET", "/v2/")
                https.getresponse().read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"registry not up:\n{self.log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)


def run(workdir: Path, seconds: float, rounds: int, connections: int) -> dict[str, list[float]]:
    ca = TestCA()
    tls = workdir / "tls.pem"
    tls.write_bytes(ca.issue([NAME]))
    tls.chmod(0o600)
    root_file = workdir / "ca.pem"
    root_file.write_bytes(ca.pem)
    storage = workdir / "storage"
    ports = free_ports(3)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    registries: list[_Registry] = []
    stack = TokenStack(
        workdir / "token",
        REGISTRY_BINARY,
        users={USER: PASSWORD},
        ttl=3600,
        storage=storage,
        ca=ca,
        access_log=True,
    )
    try:
        registries.append(_Registry(workdir / "none", ports[0], storage, tls, None))
        for index, cost in ((1, 10), (2, 4)):
            htpasswd = workdir / f"htpasswd-{cost}"
            hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()
            htpasswd.write_text(f"{USER}:{hashed}\n")
            auth = {"htpasswd": {"realm": "bench", "path": str(htpasswd)}}
            registries.append(_Registry(workdir / f"cost{cost}", ports[index], storage, tls, auth))
        for registry in registries:
            registry.wait(ca.pem)
        stack.start()
        image = workdir / "image"
        make_oci_image(image, tag="v1", size=4096)
        skopeo = Skopeo(workdir / "skopeo", ca.pem, [NAME])
        skopeo.push(image, "v1", f"{NAME}:{ports[0]}/{REPOSITORY}:v1")
        token = stack.token(f"repository:{REPOSITORY}:pull", (USER, PASSWORD))
        targets = {
            "none": (ports[0], None),
            "htpasswd cost 10": (ports[1], basic),
            "htpasswd cost 4": (ports[2], basic),
            "token": (stack.registry_port, f"Bearer {token}"),
        }
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode in MODES:
                port, header = targets[mode]
                rate, failed = measure(port, root_file, header, seconds, connections)
                if failed:
                    raise RuntimeError(f"{mode}: {failed} requests did not get 200")
                rates[mode].append(rate)
                print(f"  {mode}: {rate:,.0f} requests/s", flush=True)
        return rates
    finally:
        for registry in registries:
            registry.stop()
        stack.stop()


def table(rates: dict[str, list[float]]) -> str:
    base = statistics.median(rates["none"])
    lines = ["| auth | requests/s (median) | rounds | vs no auth |", "|---|---|---|---|"]
    for mode in MODES:
        median = statistics.median(rates[mode])
        each = ", ".join(f"{r:,.0f}" for r in rates[mode])
        lines.append(f"| {mode} | {median:,.0f} | {each} | {median / base:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="auth-rate-") as tmp:
        rates = run(Path(tmp), args.seconds, args.rounds, args.connections)
    print(table(rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
