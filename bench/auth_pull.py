"""The time of a ``docker pull`` of a 10-layer image through each mode of bench.auth_rate.

The real Docker engine (tests.support.docker: dockerd of its own, host networking, the
local CA trusted through its ``certs.d``) logs in to each authenticated path once, as an
operator would (``docker login``; in token mode that stores the token service's refresh
token), then pulls ``bench/layers:v1`` from each path in turn. Before every pull the image
is removed, so each pull downloads and extracts all layers again. The modes alternate in
order (A B C ..., then ... C B A) so that drift on a busy machine hits them alike.

A pull is 14 registry requests here, counted in the registry's access log (``/v2/`` and its
401 challenge, the manifest, the config and the 10 layer blobs): with htpasswd each one
with credentials runs bcrypt in the registry. In token mode docker fetches one access token
with its stored refresh token (no bcrypt) per pull.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.auth_rate import MODES, PASSWORD, TOKEN, USER, AuthPaths
from tests.support.clients import Skopeo
from tests.support.docker import DockerEngine
from tests.support.oci_layers import add_image
from tests.support.tokenauth import NAME

LAYERS = 10
PULL_REPOSITORY = "bench/layers"
PULL_TIMEOUT = 600.0


def push_layered_image(paths: AuthPaths, layer_bytes: int) -> None:
    """``bench/layers:v1``: ``LAYERS`` layers of ``layer_bytes`` random bytes each, pushed
    through the path without authentication (every path shares its storage)."""
    layout = paths.workdir / "layered"
    add_image(layout, "v1", [(f"layer-{i}.bin", os.urandom(layer_bytes)) for i in range(LAYERS)])
    skopeo = Skopeo(paths.workdir / "skopeo-layers", paths.ca.pem, [NAME])
    skopeo.push(layout, "v1", f"{NAME}:{paths.targets['none'].port}/{PULL_REPOSITORY}:v1")


def prepare(engine: DockerEngine, paths: AuthPaths, layer_bytes: int) -> None:
    """The image pushed, every path trusted, and docker logged in where there is auth."""
    push_layered_image(paths, layer_bytes)
    assert paths.stack is not None
    engine.trust(f"{NAME}:{paths.stack.token_port}", paths.ca.pem)
    for mode in MODES:
        target = paths.targets[mode]
        registry = f"{NAME}:{target.port}"
        engine.trust(registry, paths.ca.pem)
        if target.login:
            answer = engine.docker(
                "login", registry, "-u", USER, "--password-stdin", input=PASSWORD
            )
            if "Login Succeeded" not in answer.stdout:
                raise RuntimeError(f"{mode}: docker login: {answer.stdout} {answer.stderr}")


def pull_once(engine: DockerEngine, port: int) -> float:
    """Seconds of one ``docker pull`` from scratch (the image removed before)."""
    ref = f"{NAME}:{port}/{PULL_REPOSITORY}:v1"
    engine.docker("image", "rm", "--force", ref, check=False)
    started = time.monotonic()
    engine.docker("pull", "--quiet", ref, timeout=PULL_TIMEOUT)
    elapsed = time.monotonic() - started
    engine.docker("image", "rm", "--force", ref)
    return elapsed


def run(
    engine: DockerEngine,
    paths: AuthPaths,
    rounds: int,
    layer_bytes: int,
    log: Callable[[str], None] = print,
) -> dict[str, list[float]]:
    """Seconds per ``docker pull`` per mode, ``rounds`` pulls each, in alternating order."""
    prepare(engine, paths, layer_bytes)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    # The first pull of a session also warms the daemon (its resolver, TLS sessions): not timed.
    pull_once(engine, paths.targets["none"].port)
    for index in range(rounds):
        order = MODES if index % 2 == 0 else tuple(reversed(MODES))
        for mode in order:
            seconds = pull_once(engine, paths.targets[mode].port)
            times[mode].append(seconds)
            log(f"  {paths.version} docker pull, {mode}: {seconds:.2f} s")
    assert paths.stack is not None
    if paths.stack.counters.issued < 2 and times[TOKEN]:
        raise RuntimeError("token mode: the token service issued no token for docker")
    return times


def main(argv: list[str] | None = None) -> int:
    import argparse
    import statistics
    import tempfile

    from bench.setups import REGISTRY_BINARY
    from tests.support.docker import remove_workdir, temporary_engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-kib", type=int, default=1024)
    parser.add_argument("--binary", type=Path, default=REGISTRY_BINARY)
    args = parser.parse_args(argv)
    engine, engine_dir = temporary_engine([NAME])
    try:
        with (
            engine,
            tempfile.TemporaryDirectory(prefix="auth-pull-") as tmp,
            AuthPaths(Path(tmp), args.binary) as paths,
        ):
            times = run(engine, paths, args.rounds, args.layer_kib * 1024)
    finally:
        remove_workdir(engine_dir)
    for mode, values in times.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"{mode}: median {statistics.median(values):.2f} s ({each})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
