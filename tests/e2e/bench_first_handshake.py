"""Time from `podman run` to the first verified TLS handshake with the product image.

Each round: a fresh Pebble, fresh named volumes, `podman run -d` of the image, then a
verifying handshake (Pebble's root only, SNI checked) polled every 50 ms. Reported per
round: the whole time, how long `podman run -d` itself took (container creation: with the
vfs storage driver used here it copies every file of the image, so it is bound by the
disk and grows while other writes are pending), the rest (the agent's own start, ACME
order, registry start), and a restart on the stored certificate (`podman stop` +
`podman start`: no order).

    .venv/bin/python -m tests.e2e.bench_first_handshake [--rounds 5]

The image is built first, as the e2e tests build it: every step, no layer cache (the
Python stand-in base is made once per machine and kept). Needs what the e2e tests need
(make system-deps), as root. Other load on the machine shows in the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.e2e.common import GRACE_SECONDS, acme_env, ca_mount, served
from tests.support import podman
from tests.support.pebble import Pebble
from tests.support.ports import free_port


def one_round(workdir: Path, image: str) -> tuple[float, float, float]:
    """(run to handshake, `podman run -d` alone, start on the stored certificate)."""
    pebble = Pebble(workdir / "pebble", free_port()).start()
    try:
        with podman.named_volumes("data", "certs", "storage") as volumes:
            registry_port = free_port()
            container = podman.Container(
                image,
                acme_env(pebble, registry_port),
                [
                    f"{volumes['data']}:/data",
                    f"{volumes['certs']}:/certs",
                    f"{volumes['storage']}:/var/lib/registry",
                    ca_mount(pebble),
                ],
            )
            root = pebble.root_pem()
            try:
                started = time.monotonic()
                container.start()
                created = time.monotonic() - started
                served(registry_port, pebble)
                cold = time.monotonic() - started
                container.stop(GRACE_SECONDS)
                started = time.monotonic()
                container.restart()
                served(registry_port, pebble)
                warm = time.monotonic() - started
                assert root == pebble.root_pem()
                assert pebble.orders_created() == 1
            finally:
                container.remove()
        return cold, created, warm
    finally:
        pebble.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    built = podman.build_product_image()
    print(f"image {built.tag}: {built.size / 1e6:.1f} MB, built in {built.seconds:.1f} s")

    colds, creates, warms = [], [], []
    with tempfile.TemporaryDirectory(prefix="acme-registry-bench-") as tmp:
        for index in range(args.rounds):
            cold, created, warm = one_round(Path(tmp) / f"round-{index}", built.tag)
            colds.append(cold)
            creates.append(created)
            warms.append(warm)
            print(
                f"round {index + 1}: first verified handshake {cold:.2f} s after podman run"
                f" (podman run -d itself {created:.2f} s, then {cold - created:.2f} s);"
                f" restart {warm:.2f} s"
            )
    after_create = [cold - created for cold, created in zip(colds, creates, strict=True)]
    print(
        f"median of {args.rounds}: podman run to first verified handshake"
        f" {statistics.median(colds):.2f} s; podman run -d itself"
        f" {statistics.median(creates):.2f} s; from its return to the handshake"
        f" {statistics.median(after_create):.2f} s; start on the stored certificate"
        f" {statistics.median(warms):.2f} s"
    )


if __name__ == "__main__":
    main()
