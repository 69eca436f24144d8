"""Authenticated manifest GET rate: no auth, htpasswd (bcrypt cost 10 and 4), token mode, and
Caddy's basic_auth in front of the registry.

:class:`AuthPaths` starts every way of serving one registry storage with or without
authentication, side by side on loopback, each serving TLS for ``registry.test`` from one
local CA:

- ``none``, ``htpasswd cost 10``, ``htpasswd cost 4``: the registry binary serving TLS
  itself, the same configuration apart from ``auth`` (an htpasswd file of one user);
- ``token``: the registry's ``auth.token`` with our token service (in this process, as
  tests.support.tokenauth runs it), the user's password hashed at cost 10;
- ``Caddy basic_auth``: Caddy (TLS, ``basicauth`` with a cost-10 hash of the same password,
  ``reverse_proxy``) in front of the registry binary on plain HTTP, exactly as Caddy 2.6's
  Caddyfile adapter writes ``basicauth { bench <hash> }``: that includes ``hash_cache``,
  which remembers a successful comparison per password and hash, so only the first request
  of a client runs bcrypt;
- ``Caddy basic_auth, no cache``: the same without ``hash_cache`` (JSON config only), one
  bcrypt per request as the registry's htpasswd does.

:func:`run` measures the rate: ``connections`` curl processes, each one keep-alive HTTPS
connection sending ``GET /v2/bench/app/manifests/v1`` as fast as it is answered, for
``seconds`` per mode; the modes run one after the other (in alternating order), ``rounds``
times, in one run. For
token mode the token is fetched once; the registry then checks its ES256 signature per
request (the token names its key by ``kid`` for 3.x and by ``x5c`` for 2.8, as the agent's
tokens do). ``bench.auth_pull`` times ``docker pull`` on the same paths.

Run: .venv/bin/python -m bench.auth_rate [--seconds 10] [--rounds 2] [--connections 4]
     [--binary /opt/registry3/registry] [--key-references] [--no-pin]

``--key-references`` measures instead how the way a token names its key costs the
registry: no auth, then the token registry with the same claims signed twice, once naming
the key by ``x5c`` and once by ``kid`` (3.x only: 2.8 refuses our ``kid``), alternating, so
both token rows come from one registry process (:func:`run_key_references`).

Pinning (:class:`Pinning`, on unless ``--no-pin``): on a machine of two or more cores the
servers (every registry, Caddy, the token service) run on the first half of the cores and
the curl clients on the rest, for every mode alike, so that a client's work (about 290 us
of CPU per request on 2 cores here, a third of what 3.1.1 spends serving one) does not
take CPU from the server it measures; otherwise the ratio partly measures how the kernel
shares two cores between a Go server and four curl processes. Other work on the machine
still shares both halves. Each round also records the servers' and the clients' CPU time
per request (``/proc``, ``RUSAGE_CHILDREN``): it depends far less on that other work than
the rate does.

The clients share the machine with the servers, so absolute rates depend on the machine and
whatever else runs; the ratios against no auth, measured in one run, are the point.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import bcrypt

from acme_registry.tokens import KeyReference, b64url_decode
from bench.setups import CADDY_BINARY, REGISTRY_BINARY, clean_env, registry_config, stop_process
from tests.support.clients import Skopeo
from tests.support.lifecycle import StartStop
from tests.support.oci import MANIFEST_MEDIA_TYPE, make_oci_image
from tests.support.ports import free_ports
from tests.support.tls import TestCA
from tests.support.tokenauth import NAME, TokenStack

USER = "bench"
PASSWORD = "bench-Pa55word-for-the-rate-run"
REPOSITORY = "bench/app"
PERSON_COST = 10  # the cost of a password a person chose (ours, and Caddy's here)
NONE = "none"
TOKEN = "token"
CADDY = "Caddy basic_auth"
CADDY_NO_CACHE = "Caddy basic_auth, no cache"
MODES = (NONE, "htpasswd cost 10", "htpasswd cost 4", TOKEN, CADDY, CADDY_NO_CACHE)
# The goal of issue 11: token mode at least this share of the rate without authentication.
GOAL_TOKEN_SHARE = 0.6


@dataclass(frozen=True)
class Target:
    """Where one mode is served and how a client authenticates to it."""

    port: int
    header: str | None  # the Authorization header a rate client sends
    login: bool  # whether docker logs in (with USER / PASSWORD) before pulling
    pids: tuple[int, ...] = ()  # the server processes whose CPU time a request costs


@dataclass(frozen=True)
class Pinning:
    """Which cores the servers and the clients run on (``taskset``/affinity CPU sets)."""

    server: frozenset[int]
    client: frozenset[int]

    @classmethod
    def split(cls, cpus: set[int] | None = None) -> Pinning | None:
        """The first half of the usable cores for the servers, the rest for the clients;
        None on one core."""
        usable = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
        if len(usable) < 2:
            return None
        half = len(usable) // 2
        return cls(frozenset(usable[:half]), frozenset(usable[half:]))

    def describe(self) -> str:
        return f"servers on CPU {_cpu_list(self.server)}, clients on CPU {_cpu_list(self.client)}"


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class Sample:
    """One round of one mode: the rate and the CPU time it cost per request."""

    rate: float  # successful requests per second
    server_us: float  # the servers' CPU microseconds per request
    client_us: float  # the curl clients' CPU microseconds per request


def registry_version(binary: Path) -> str:
    """``registry 2.8.2`` from the binary's ``--version`` (as bench.rotation names it)."""
    from acme_registry.activation import binary_version, parse_version

    version = parse_version(binary_version(str(binary)))
    return f"registry {version.version}" if version else f"registry {binary.name}"


def measure(
    port: int,
    root_file: Path,
    header: str | None,
    seconds: float,
    connections: int,
    client_cpus: frozenset[int] | None = None,
) -> tuple[float, int]:
    """(successful requests per second, failed requests) over ``connections`` clients
    (on ``client_cpus`` when given).

    Each client is one curl process sending a million GETs (URL globbing) over one
    keep-alive connection to ``registry.test`` (resolved to 127.0.0.1: Caddy picks its
    certificate by SNI), stopped after ``seconds``; curl's per-transfer status lines are the
    count (on stderr: unbuffered, so a SIGTERM loses none). curl is C: a Python client would
    be the bottleneck, not the registry.
    """
    url = f"https://{NAME}:{port}/v2/{REPOSITORY}/manifests/v1?n=[1-1000000]"
    command = [
        "curl", "-s", "--http1.1", "--cacert", str(root_file), "-o", "/dev/null",
        "--resolve", f"{NAME}:{port}:127.0.0.1",
        "-w", "%{stderr}%{http_code}\\n", "-H", f"Accept: {MANIFEST_MEDIA_TYPE}",
    ]  # fmt: skip
    if header:
        command += ["-H", f"Authorization: {header}"]
    if client_cpus:
        command = ["taskset", "-c", _cpu_list(client_cpus), *command]
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
    """The registry binary with ``auth`` (or none), TLS from the shared CA (or plain HTTP,
    behind Caddy)."""

    def __init__(
        self,
        workdir: Path,
        binary: Path,
        port: int,
        storage: Path,
        tls: Path | None,
        auth: dict[str, object] | None,
        log_settings: dict[str, object] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = registry_config(port, storage, "bench-http-secret", tls)
        if auth is not None:
            config["auth"] = auth
        if log_settings:
            log_config = config["log"]
            assert isinstance(log_config, dict)
            log_config.update(log_settings)
        path = workdir / "registry.yml"
        path.write_text(json.dumps(config, indent=2))
        self.port = port
        self.log = workdir / "registry.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "serve", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none"},
            )

    def stop(self) -> None:
        stop_process(self.proc)


def caddy_config(
    tls_file: Path, storage: Path, upstream_port: int, ports: dict[str, int], hashed: str
) -> dict[str, Any]:
    """Caddy's JSON config: one TLS server per entry of ``ports`` (``CADDY`` with the
    Caddyfile adapter's ``hash_cache``, ``CADDY_NO_CACHE`` without), each ``basicauth`` then
    ``reverse_proxy`` to the registry. The same as ``caddy adapt`` gives for a Caddyfile
    site with ``tls CERT KEY``, ``basicauth { bench <hash> }`` and ``reverse_proxy``."""
    servers = {}
    for mode, port in ports.items():
        basic: dict[str, Any] = {
            "accounts": [{"username": USER, "password": hashed}],
            "hash": {"algorithm": "bcrypt"},
        }
        if mode == CADDY:
            basic["hash_cache"] = {}
        servers[f"srv{len(servers)}"] = {
            "listen": [f"127.0.0.1:{port}"],
            "routes": [
                {
                    "handle": [
                        {"handler": "authentication", "providers": {"http_basic": basic}},
                        {
                            "handler": "reverse_proxy",
                            "upstreams": [{"dial": f"127.0.0.1:{upstream_port}"}],
                        },
                    ]
                }
            ],
            "tls_connection_policies": [{}],
            "automatic_https": {"disable": True},
        }
    return {
        "admin": {"disabled": True},
        "storage": {"module": "file_system", "root": str(storage)},
        "apps": {
            "http": {"servers": servers},
            "tls": {
                "certificates": {
                    "load_files": [{"certificate": str(tls_file), "key": str(tls_file)}]
                }
            },
        },
    }


class AuthPaths(StartStop):
    """Every mode of :data:`MODES` up on one storage holding ``bench/app:v1``."""

    def __init__(
        self, workdir: Path, binary: Path = REGISTRY_BINARY, pinning: Pinning | None = None
    ) -> None:
        self.workdir = workdir
        self.binary = binary
        self.pinning = pinning
        self.version = registry_version(binary)
        self.ca = TestCA()
        self.tls = workdir / "tls.pem"
        self.root_file = workdir / "ca.pem"
        self.storage = workdir / "storage"
        self.targets: dict[str, Target] = {}
        self._registries: list[_Registry] = []
        self._upstream: _Registry | None = None
        self._caddy: subprocess.Popen[bytes] | None = None
        self._caddy_log: IO[bytes] | None = None
        self.stack: TokenStack | None = None

    def start(self) -> AuthPaths:
        # Every server started here inherits this thread's affinity (its token service
        # thread too); the clients get theirs in measure().
        previous = os.sched_getaffinity(0)
        if self.pinning is not None:
            os.sched_setaffinity(0, self.pinning.server)
        try:
            return self._start()
        finally:
            os.sched_setaffinity(0, previous)

    def _start(self) -> AuthPaths:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls.write_bytes(self.ca.issue([NAME]))
        self.tls.chmod(0o600)
        self.root_file.write_bytes(self.ca.pem)
        none_port, cost10_port, cost4_port, upstream, caddy, caddy_plain = free_ports(6)
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        hashes = {
            cost: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()
            for cost in (PERSON_COST, 4)
        }
        self._registries.append(
            _Registry(self.workdir / "none", self.binary, none_port, self.storage, self.tls, None)
        )
        self.targets[NONE] = Target(none_port, None, False, (self._registries[0].proc.pid,))
        for cost, port in ((PERSON_COST, cost10_port), (4, cost4_port)):
            htpasswd = self.workdir / f"htpasswd-{cost}"
            htpasswd.write_text(f"{USER}:{hashes[cost]}\n")
            auth = {"htpasswd": {"realm": "bench", "path": str(htpasswd)}}
            self._registries.append(
                _Registry(
                    self.workdir / f"cost{cost}", self.binary, port, self.storage, self.tls, auth
                )
            )
            pid = self._registries[-1].proc.pid
            self.targets[f"htpasswd cost {cost}"] = Target(port, basic, True, (pid,))

        self.stack = TokenStack(
            self.workdir / "token",
            self.binary,
            users={USER: PASSWORD},
            ttl=3600,
            storage=self.storage,
            ca=self.ca,
            access_log=True,
        )
        self.stack.hashes[USER] = hashes[PERSON_COST]  # a chosen password: cost 10, as ours
        for registry in self._registries:
            _wait_https(registry.port, self.ca.pem, registry.proc, registry.log)
        self.stack.start()

        self._upstream = _Registry(
            self.workdir / "upstream", self.binary, upstream, self.storage, None, None
        )
        config = caddy_config(
            self.tls,
            self.workdir / "caddy-storage",
            upstream,
            {CADDY: caddy, CADDY_NO_CACHE: caddy_plain},
            hashes[PERSON_COST],
        )
        config_path = self.workdir / "caddy.json"
        config_path.write_text(json.dumps(config, indent=1))
        self._caddy_log = (self.workdir / "caddy.log").open("ab")
        self._caddy = subprocess.Popen(
            [CADDY_BINARY, "run", "--config", str(config_path)],
            stdout=self._caddy_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env(
                HOME=str(self.workdir),
                XDG_DATA_HOME=str(self.workdir / "xdg-data"),
                XDG_CONFIG_HOME=str(self.workdir / "xdg-config"),
            ),
        )
        for port in (caddy, caddy_plain):
            _wait_https(port, self.ca.pem, self._caddy, self.workdir / "caddy.log")
        behind = (self._caddy.pid, self._upstream.proc.pid)  # Caddy and its registry
        self.targets[CADDY] = Target(caddy, basic, True, behind)
        self.targets[CADDY_NO_CACHE] = Target(caddy_plain, basic, True, behind)

        image = self.workdir / "image"
        make_oci_image(image, tag="v1", size=4096)
        skopeo = Skopeo(self.workdir / "skopeo", self.ca.pem, [NAME])
        skopeo.push(image, "v1", f"{NAME}:{none_port}/{REPOSITORY}:v1")
        token = self.stack.token(f"repository:{REPOSITORY}:pull", (USER, PASSWORD))
        assert self.stack.proc is not None
        self.targets[TOKEN] = Target(
            self.stack.registry_port, f"Bearer {token}", True, (self.stack.proc.pid,)
        )
        return self

    def stop(self) -> None:
        stop_process(self._caddy)
        if self._caddy_log is not None:
            self._caddy_log.close()
        if self._upstream is not None:
            self._upstream.stop()
        for registry in self._registries:
            registry.stop()
        if self.stack is not None:
            self.stack.stop()


def _wait_https(
    port: int, root_pem: bytes, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    """Until ``GET /v2/`` on ``port`` answers at all over verified TLS (401 counts)."""
    context = ssl.create_default_context(cadata=root_pem.decode())
    deadline = time.monotonic() + timeout
    while True:
        try:
            https = http.client.HTTPSConnection(NAME, port, context=context, timeout=5)
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            https.sock = context.wrap_socket(raw, server_hostname=NAME)
            https.request("GET", "/v2/")
            https.getresponse().read()
            https.close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"nothing serving on port {port}:\n{tail}") from None
            time.sleep(0.05)


def sample(paths: AuthPaths, mode: str, target: Target, seconds: float, connections: int) -> Sample:
    """One round of one mode; a non-200 answer is an error."""
    client = paths.pinning.client if paths.pinning else None
    return sample_target(mode, target, paths.root_file, client, seconds, connections)


def sample_target(
    mode: str,
    target: Target,
    root_file: Path,
    client: frozenset[int] | None,
    seconds: float,
    connections: int,
) -> Sample:
    """One round against ``target`` (its clients on ``client``); a non-200 answer is an error."""
    server_before = sum(process_cpu_seconds(pid) for pid in target.pids)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate, failed = measure(target.port, root_file, target.header, seconds, connections, client)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = sum(process_cpu_seconds(pid) for pid in target.pids) - server_before
    if failed:
        raise RuntimeError(f"{mode}: {failed} requests did not get 200")
    # Only the clients are reaped during a measurement: the children's growth is theirs.
    client_seconds = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    requests = rate * seconds
    return Sample(rate, server / requests * 1e6, client_seconds / requests * 1e6)


def run(
    paths: AuthPaths, seconds: float, rounds: int, connections: int, log: Any = print
) -> dict[str, list[Sample]]:
    """One :class:`Sample` per mode and round."""
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    for index in range(rounds):
        # Alternating order (A B C ..., then ... C B A): drift on a busy machine hits all alike.
        for mode in MODES if index % 2 == 0 else tuple(reversed(MODES)):
            one = sample(paths, mode, paths.targets[mode], seconds, connections)
            samples[mode].append(one)
            log(
                f"  {paths.version} {mode}: {one.rate:,.0f} requests/s, server "
                f"{one.server_us:,.0f} us / client {one.client_us:,.0f} us CPU per request "
                f"(load {os.getloadavg()[0]:.1f})"
            )
    return samples


def key_reference_tokens(paths: AuthPaths) -> dict[str, str]:
    """The bench user's pull token signed as ``x5c`` and (3.x) as ``kid``, same claims."""
    assert paths.stack is not None
    token = paths.stack.token(f"repository:{REPOSITORY}:pull", (USER, PASSWORD))
    claims = json.loads(b64url_decode(token.split(".")[1]))
    key = paths.stack.keyring.current
    references = [KeyReference.X5C]
    if paths.stack.key_reference is KeyReference.KID:
        references.append(KeyReference.KID)
    return {f"token, {r}": key.sign(claims, r) for r in references}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_key_references(
    paths: AuthPaths, seconds: float, rounds: int, connections: int, log: Any = print
) -> dict[str, list[Sample]]:
    """No auth, and the token registry with each key reference, alternating: one
    :class:`Sample` per mode and round."""
    assert paths.stack is not None and paths.stack.proc is not None
    targets = {NONE: paths.targets[NONE]}
    for mode, token in key_reference_tokens(paths).items():
        targets[mode] = Target(
            paths.stack.registry_port, f"Bearer {token}", True, (paths.stack.proc.pid,)
        )
    samples: dict[str, list[Sample]] = {mode: [] for mode in targets}
    for index in range(rounds):
        for mode in targets if index % 2 == 0 else tuple(reversed(targets)):
            one = sample(paths, mode, targets[mode], seconds, connections)
            samples[mode].append(one)
            log(
                f"  {paths.version} {mode}: {one.rate:,.0f} requests/s, {one.server_us:,.0f} us CPU"
            )
    return samples


def table(samples: dict[str, list[Sample]]) -> str:
    """Rates and CPU per request, each with its ratio to no auth (for CPU: no auth's CPU
    over the mode's, the rate one core of the server could give, relative)."""
    base_rate = statistics.median(s.rate for s in samples[NONE])
    base_cpu = statistics.median(s.server_us for s in samples[NONE])
    lines = [
        "| auth | requests/s (median) | rounds | vs no auth | server CPU us/request (median) "
        "| rounds | no auth's CPU / this | client CPU us/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, values in samples.items():
        rate = statistics.median(s.rate for s in values)
        cpu = statistics.median(s.server_us for s in values)
        client = statistics.median(s.client_us for s in values)
        rates = ", ".join(f"{s.rate:,.0f}" for s in values)
        cpus = ", ".join(f"{s.server_us:,.0f}" for s in values)
        lines.append(
            f"| {mode} | {rate:,.0f} | {rates} | {rate / base_rate:.3f} | {cpu:,.0f} | {cpus} "
            f"| {base_cpu / cpu:.2f} | {client:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--binary", type=Path, default=REGISTRY_BINARY)
    parser.add_argument(
        "--key-references", action="store_true", help="none vs token with x5c vs with kid"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="servers and clients on every core (default: servers on the first half)",
    )
    args = parser.parse_args(argv)
    pinning = None if args.no_pin else Pinning.split()
    print(pinning.describe() if pinning else "not pinned")
    with (
        tempfile.TemporaryDirectory(prefix="auth-rate-") as tmp,
        AuthPaths(Path(tmp), args.binary, pinning) as paths,
    ):
        if args.key_references:
            samples = run_key_references(paths, args.seconds, args.rounds, args.connections)
        else:
            samples = run(paths, args.seconds, args.rounds, args.connections)
    print(table(samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
