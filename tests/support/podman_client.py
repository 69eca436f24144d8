"""podman as a registry client (login, push, pull) against a registry on the host's loopback.

Like :class:`tests.support.clients.Skopeo`: TLS verified against one root only, the test
names resolved to loopback through a private /etc/hosts (a mount namespace of its own), and
everything podman keeps (image storage, the auth file, registries.conf) under ``workdir``, so
neither the machine's image store nor its credentials take part.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.clients import run_with_hosts
from tests.support.podman import GLOBAL_ARGS, podman_env


class PodmanClient:
    """``podman login/push/pull`` trusting ``root_pem``, resolving ``names`` to loopback."""

    def __init__(self, workdir: Path, root_pem: bytes, names: list[str]) -> None:
        self.workdir = Path(workdir)
        self.names = list(names)
        self.cert_dir = self.workdir / "certs"
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        (self.cert_dir / "ca.crt").write_bytes(root_pem)
        self.empty_cert_dir = self.workdir / "no-system-certs"
        self.empty_cert_dir.mkdir(exist_ok=True)
        self.auth_file = self.workdir / "auth.json"
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text("")
        # podman refuses a run root longer than 50 characters: a short one under /tmp.
        self.run_root = Path(tempfile.mkdtemp(prefix="podman-run-"))
        self.env = podman_env(
            {
                "SSL_CERT_FILE": str(self.cert_dir / "ca.crt"),
                "SSL_CERT_DIR": str(self.empty_cert_dir),
                "REGISTRY_AUTH_FILE": str(self.auth_file),
                "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            }
        )

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``podman ARGS`` with the private storage; AssertionError if ``check`` fails."""
        cmd = [
            "podman",
            *GLOBAL_ARGS,
            "--root",
            str(self.workdir / "storage"),
            "--runroot",
            str(self.run_root),
            *args,
        ]
        result = run_with_hosts(cmd, self.names, self.workdir, env=self.env, timeout=180)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def close(self) -> None:
        shutil.rmtree(self.run_root, ignore_errors=True)

    def __enter__(self) -> PodmanClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _tls(self) -> list[str]:
        return ["--tls-verify=true", "--cert-dir", str(self.cert_dir)]

    def login(
        self, registry: str, user: str, password: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("login", *self._tls(), "-u", user, "-p", password, registry, check=check)

    def logout(self, registry: str) -> None:
        self.run("logout", registry)

    def load_oci(self, oci_dir: Path, tag: str, name: str) -> None:
        """Put ``oci:oci_dir:tag`` into the private storage as ``name``."""
        self.run("pull", "--quiet", f"oci:{oci_dir}:{tag}")
        images = self.run("images", "--quiet", "--no-trunc").stdout.split()
        self.run("tag", images[0], name)

    def push(self, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("push", *self._tls(), name, f"docker://{name}", check=check)

    def pull(self, name: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("pull", *self._tls(), f"docker://{name}", check=check)

    def remove(self, name: str) -> None:
        self.run("rmi", "--force", name, check=False)
