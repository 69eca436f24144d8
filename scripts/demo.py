"""`make demo`: the whole job on one machine, without a public domain.

Starts a local ACME CA (Pebble, Let's Encrypt's test server) whose DNS stub sends every
name to this machine, builds the image (docker when a Docker engine answers, else podman),
runs it, pushes a small image over verified TLS, pulls it back, prints what an operator
wants to see, and removes everything it started except the image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import podman as podman_support  # noqa: E402
from tests.support.clients import Skopeo, wait_for_tls  # noqa: E402
from tests.support.oci import layout_manifest_digest, make_oci_image  # noqa: E402
from tests.support.pebble import Pebble  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

NAME = "registry.demo.test"
CONTAINER = "acme-registry-demo"
VOLUMES = ("acme-registry-demo-data", "acme-registry-demo-certs", "acme-registry-demo-storage")
IMAGE = "localhost/acme-registry:demo"


class Engine:
    """docker when a Docker engine answers, else podman with this machine's settings."""

    def __init__(self) -> None:
        docker = shutil.which("docker")
        self.docker = (
            bool(docker)
            and subprocess.run(
                ["docker", "info"], capture_output=True, timeout=20, check=False
            ).returncode
            == 0
        )

    @property
    def name(self) -> str:
        return "docker" if self.docker else "podman"

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        if self.docker:
            result = subprocess.run(
                ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
            )
            if check and result.returncode != 0:
                raise RuntimeError(f"docker {args[0]}: {result.stderr.strip()}")
            return result.stdout
        return podman_support.podman(*args, check=check, timeout=timeout).stdout

    def build(self) -> float:
        started = time.monotonic()
        if self.docker:
            self.run("build", "-t", IMAGE, str(REPO), timeout=1800)
        else:
            # Nothing can be pulled here: stand-ins for python:3.13-slim and registry:3.
            podman_support.build_product_image(IMAGE)
        return time.monotonic() - started


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def cleanup(engine: Engine) -> None:
    engine.run("rm", "-f", CONTAINER, check=False)
    for volume in VOLUMES:
        engine.run("volume", "rm", "-f", volume, check=False)


def main() -> int:
    engine = Engine()
    cleanup(engine)  # what an interrupted earlier run may have left
    work = Path(tempfile.mkdtemp(prefix="acme-registry-demo-"))
    http_port, https_port, admin_port = free_port(), free_port(), free_port()
    step("starting a local ACME CA (Pebble) whose DNS sends every name to this machine")
    pebble = Pebble(work / "pebble", http_port, nonce_reject=0).start()
    try:
        step(f"building the image with {engine.name} (the first build takes a few minutes)")
        print(f"    built {IMAGE} in {engine.build():.0f} s")
        ca = work / "pebble-ca.pem"
        shutil.copy(pebble.ca_bundle, ca)
        ca.chmod(0o644)
        for volume in VOLUMES:
            engine.run("volume", "create", volume)
        step(f"running it for {NAME}: ports {http_port} (HTTP-01) and {https_port} (registry)")
        started = time.monotonic()
        engine.run(
            "run", "-d", "--name", CONTAINER, "--network", "host",
            "-e", f"ACME_DOMAINS={NAME}",
            "-e", f"ACME_DIRECTORY={pebble.directory_url}",
            "-e", "ACME_CA_BUNDLE=/pebble-ca.pem",
            "-e", f"ACME_HTTP_PORT={http_port}",
            "-e", f"REGISTRY_HTTP_ADDR=127.0.0.1:{https_port}",
            "-e", f"ADMIN_ADDR=127.0.0.1:{admin_port}",
            "-v", f"{ca}:/pebble-ca.pem:ro",
            "-v", f"{VOLUMES[0]}:/data",
            "-v", f"{VOLUMES[1]}:/certs",
            "-v", f"{VOLUMES[2]}:/var/lib/registry",
            IMAGE,
        )  # fmt: skip
        root = pebble.root_pem()
        leaf = wait_for_tls("127.0.0.1", https_port, NAME, root, timeout=120)
        print(f"    certificate served {time.monotonic() - started:.2f} s after start")
        password = engine.run("exec", CONTAINER, "cat", "/data/auth/initial-admin-password").strip()

        layout = work / "image"
        make_oci_image(layout, tag="v1", size=2 * 1024 * 1024)
        skopeo = Skopeo(work / "skopeo", root, [NAME], creds=f"admin:{password}")
        ref = f"{NAME}:{https_port}/demo/hello:v1"
        step(f"pushing a 2 MB image to {ref}, verifying TLS against the CA's root only")
        began = time.monotonic()
        skopeo.push(layout, "v1", ref)
        push_seconds = time.monotonic() - began
        began = time.monotonic()
        skopeo.pull(ref, work / "pulled", "v1")
        pull_seconds = time.monotonic() - began
        same = layout_manifest_digest(layout, "v1") == layout_manifest_digest(work / "pulled", "v1")

        status = json.loads(engine.run("exec", CONTAINER, "acme-registry", "status", "--json"))
        cert = status["certificate"]
        print()
        print(f"  names:         {', '.join(cert['names'])}")
        print(f"  issuer:        {cert['issuer']}")
        print(f"  serial:        {cert['serial']}")
        print(f"  valid until:   {cert['not_after']}")
        print(f"  next renewal:  {cert['renewal']['at']} ({cert['renewal']['reason']})")
        print(f"  push:          {push_seconds:.2f} s")
        print(f"  pull:          {pull_seconds:.2f} s (same digest: {'yes' if same else 'NO'})")
        print(f"  TLS subject:   {leaf.subject.rfc4514_string() or '(names in SAN)'}")
        print()
        print(f"  logged in as:  admin / {password}  (a throwaway demo password)")
        print("  with your own deployment, read the generated admin password with")
        print("    docker exec <container> cat /data/auth/initial-admin-password")
        print("  then: docker login <your registry name> -u admin")
        print()
        return 0 if same else 1
    finally:
        step("cleaning up: the container, its volumes and the local CA")
        cleanup(engine)
        pebble.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"    the image {IMAGE} stays; remove it with: {engine.name} rmi {IMAGE}")


if __name__ == "__main__":
    sys.exit(main())
