"""podman for the e2e tests: the machine's settings, stand-in base images, the product image.

No Docker engine runs on these machines by default (tests/support/docker.py starts one of
the tests' own and moves this build into it) and nothing can be pulled from public container
registries, so the image is built with podman on local stand-ins for ``python:3.13-slim``
(a debootstrapped Debian with python3) and ``registry:3`` (Debian's registry binary).
Every podman call goes through :func:`podman`, which adds what podman needs here: the
project's containers.conf, the runc runtime and the vfs storage driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
# crun fails on these machines (setrlimit) and overlayfs is unavailable.
GLOBAL_ARGS = ("--runtime", "runc", "--storage-driver", "vfs")

SUITE = "bookworm"
PYTHON_BASE = f"localhost/acme-registry-test/python:{SUITE}"
REGISTRY_BASE = "localhost/acme-registry-test/registry"
# The image store is the machine's: a tag per checkout keeps test runs of two checkouts
# (a developer's and CI's) from replacing each other's image.
PRODUCT_IMAGE = (
    "localhost/acme-registry-test/acme-registry:"
    + hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
)
DEBIAN_REGISTRY_BINARY = Path("/usr/bin/docker-registry")
SLIM_EXCLUDED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
# The image's user; bind mounts must belong to it.
IMAGE_UID = 10001
IMAGE_GID = 10001

BUILD_TIMEOUT = 900
DEFAULT_TIMEOUT = 120


class PodmanError(AssertionError):
    """A podman command failed; the message holds the command and its output."""


def podman_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    if extra:
        env.update(extra)
    return env


def podman(
    *args: str,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` with this machine's settings; raise PodmanError if ``check`` fails."""
    cmd = ["podman", *GLOBAL_ARGS, *args]
    result = subprocess.run(
        cmd,
        env=podman_env(),
        capture_output=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )
    completed = subprocess.CompletedProcess(
        cmd,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise PodmanError(
            f"{shlex.join(cmd)} exited {result.returncode}:\n"
            f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
        )
    return completed


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def image_id(tag: str) -> str | None:
    result = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def image_config(tag: str) -> dict[str, Any]:
    """``podman image inspect`` of ``tag`` (the first and only element)."""
    return dict(json.loads(podman("image", "inspect", tag).stdout)[0])


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


# -- stand-in base images ------------------------------------------------------------------


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses for ``SUITE``.

    Read from the machine, never written into the repository: the tests must work with
    whichever mirror a machine is set up with.
    """
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split():
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, fields.get("suites", "").split()))
    for path in [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()
            if len(parts) >= 3 and parts[0] == "deb":
                candidates.append((parts[1], [parts[2]]))
    for uri, suites in candidates:
        if SUITE in suites:
            return uri
    raise RuntimeError(f"no apt source for Debian {SUITE} in {sources_dir}: cannot debootstrap")


def build_python_base(tag: str = PYTHON_BASE) -> str:
    """A Debian base with python3 and venv: the stand-in for the official python image."""
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="acme-registry-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        result = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                SUITE,
                str(rootfs),
                debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-4000:]}{result.stderr}")
        # Like Debian's slim images (under python:*-slim): no package lists, downloaded .debs,
        # documentation or translations. Smaller is faster here too: vfs copies every file
        # of the image into each new container.
        for leftover in ("var/cache/apt", "var/lib/apt/lists", *SLIM_EXCLUDED):
            for path in (rootfs / leftover).glob("**/*"):
                if path.is_file() and path.name != "copyright":
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            assert tar.stdout is not None
            imported = subprocess.run(
                ["podman", *GLOBAL_ARGS, "import", "-", tag],
                stdin=tar.stdout,
                env=podman_env(),
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"podman import failed:\n{imported.stderr}")
    return tag


def build_registry_base() -> str:
    """A stand-in for the official registry image: only /bin/registry, as upstream has it.

    Debian's binary is linked against glibc: fine on the Debian base used here. Each build
    gets its own (a label makes the image ID unique), because the product build deletes it.
    ``ACME_REGISTRY_TEST_REGISTRY_BINARY`` puts another binary in (a 3.x built by hand), as
    it does for the integration tests.
    """
    binary = Path(os.environ.get("ACME_REGISTRY_TEST_REGISTRY_BINARY", DEBIAN_REGISTRY_BINARY))
    if not binary.is_file():
        raise RuntimeError(
            f"{binary} is missing: apt-get install docker-registry "
            "(or set ACME_REGISTRY_TEST_REGISTRY_BINARY)"
        )
    build_id = uuid.uuid4().hex[:12]
    tag = f"{REGISTRY_BASE}:{'2.8' if binary == DEBIAN_REGISTRY_BINARY else 'custom'}-{build_id}"
    with tempfile.TemporaryDirectory(prefix="acme-registry-regimage-") as tmp:
        context = Path(tmp)
        shutil.copy2(binary, context / "registry")
        (context / "Containerfile").write_text(
            f"FROM scratch\nLABEL acme-registry-test.build={build_id}\n"
            "COPY registry /bin/registry\n"
        )
        # No layers: a cached step would stay behind as an untagged image after each build.
        podman(
            "build",
            "--layers=false",
            "--format",
            "docker",
            "-t",
            tag,
            str(context),
            timeout=BUILD_TIMEOUT,
        )
    return tag


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    seconds: float
    size: int


def build_product_image(
    tag: str = PRODUCT_IMAGE,
    *,
    python_image: str = PYTHON_BASE,
    registry_image: str | None = None,
    extra_args: Sequence[str] = (),
) -> BuiltImage:
    """Build this repository's Dockerfile on the stand-ins; replaces the previous build.

    The Python stand-in is made once per machine. buildah without layers deletes the image
    of a stage that has no instruction of its own (the registry stage), so unless
    ``registry_image`` is given, a registry stand-in (well under a second) is made for this
    build alone.
    """
    if python_image == PYTHON_BASE:
        build_python_base(python_image)
    own_registry_image = registry_image is None
    if registry_image is None:
        registry_image = build_registry_base()
    previous = image_id(tag)
    started = time.monotonic()
    try:
        podman(
            "build",
            # With vfs every cached layer is a full copy of the image's files: a commit per
            # step makes the build twice as slow and leaves gigabytes behind.
            "--layers=false",
            # The OCI format has no HEALTHCHECK; podman would drop it.
            "--format",
            "docker",
            "--network",
            "host",
            # pip inside the build reaches PyPI only with the machine's settings and CA bundle.
            "-v",
            "/etc/pip.conf:/etc/pip.conf:ro",
            "-v",
            "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
            "--build-arg",
            f"PYTHON_IMAGE={python_image}",
            "--build-arg",
            f"REGISTRY_IMAGE={registry_image}",
            *extra_args,
            "-t",
            tag,
            "-f",
            str(REPO / "Dockerfile"),
            str(REPO),
            timeout=BUILD_TIMEOUT,
        )
    finally:
        if own_registry_image:
            podman("rmi", "--force", registry_image, check=False)
    seconds = time.monotonic() - started
    if previous and previous != image_id(tag):
        podman("rmi", previous, check=False)
    return BuiltImage(tag, seconds, image_size(tag))


# -- containers ----------------------------------------------------------------------------


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def owned_dir(path: Path, uid: int = IMAGE_UID, gid: int = IMAGE_GID) -> Path:
    """A directory for a bind mount, owned by the image's user as the README asks."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    return path


@dataclass
class Container:
    """One ``podman run -d`` of an image, with the settings the tests share.

    On the host network unless told otherwise: Pebble, its DNS stub and skopeo are on the
    host's loopback.
    """

    image: str
    env: dict[str, str]
    volumes: list[str] = field(default_factory=list)
    name: str = field(default_factory=lambda: unique_name("acme-registry-e2e"))
    args: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    network: str = "host"

    def run_args(self) -> list[str]:
        args = ["--name", self.name, "--network", self.network, *self.args]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        for volume in self.volumes:
            args += ["-v", volume]
        return [*args, self.image, *self.command]

    def start(self) -> Container:
        """``podman run -d``; the clock for "time to first handshake" starts before this."""
        podman("run", "-d", *self.run_args())
        return self

    def run_foreground(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``podman run --rm`` to the end: for runs that must stop at once."""
        return podman("run", "--rm", *self.run_args(), check=False, timeout=timeout)

    def restart(self) -> Container:
        podman("start", self.name)
        return self

    def state(self) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", self.name).stdout)[0]["State"])

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def exit_code(self) -> int:
        return int(self.state()["ExitCode"])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, check=False, timeout=timeout)

    def stop(self, grace: int) -> float:
        """``podman stop -t grace`` (SIGTERM, then SIGKILL after grace); seconds it took."""
        started = time.monotonic()
        podman("stop", "-t", str(grace), self.name, timeout=grace + 60)
        return time.monotonic() - started

    def wait(self, timeout: float = 60) -> int:
        result = podman("wait", self.name, timeout=timeout)
        return int(result.stdout.strip().splitlines()[-1])

    def remove(self) -> None:
        """Remove it with its anonymous volumes (named ones stay)."""
        podman("rm", "-f", "-v", "-t", "0", self.name, check=False)


@contextlib.contextmanager
def named_volumes(*purposes: str) -> Iterator[dict[str, str]]:
    """Fresh named volumes (purpose -> name), removed afterwards with their content."""
    names = {purpose: unique_name(f"acme-registry-e2e-{purpose}") for purpose in purposes}
    try:
        for name in names.values():
            podman("volume", "create", name)
        yield names
    finally:
        for name in names.values():
            podman("volume", "rm", "-f", name, check=False)


def podman_compose(
    project: str, files: list[Path], *args: str, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`python -m podman_compose` with the tests' podman settings, the files in order."""
    cmd = [
        sys.executable,
        "-m",
        "podman_compose",
        f"--podman-args={' '.join(GLOBAL_ARGS)}",
        "-p",
        project,
        *(arg for path in files for arg in ("-f", str(path))),
        *args,
    ]
    return subprocess.run(
        cmd,
        env=podman_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
