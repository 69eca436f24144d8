"""Real clients (skopeo, a TLS probe) that reach test servers by DNS name on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from cryptography import x509

# Proxies are for reaching package mirrors; a Go or Python client would otherwise send
# "registry.test" (not a loopback literal, so not exempt) to the proxy.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    """This process's environment without proxy variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    if extra:
        env.update(extra)
    return env


def write_hosts_file(path: Path, names: list[str]) -> Path:
    """Write a hosts file mapping localhost and every name to 127.0.0.1 and ::1."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_names = " ".join(["localhost", *names])
    path.write_text(f"127.0.0.1 {all_names}\n::1 {all_names}\n")
    return path


def _hosts_command(cmd: list[str], hosts_file: Path) -> list[str]:
    # A private mount namespace (util-linux defaults it to private propagation) lets the
    # bind mount shadow /etc/hosts for this command only; the machine's file is untouched.
    script = f'mount --bind {shlex.quote(str(hosts_file))} /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", *cmd]


def _run(
    cmd: list[str],
    names: list[str],
    workdir: Path,
    env: dict[str, str] | None,
    timeout: float,
    text: bool,
) -> subprocess.CompletedProcess[Any]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    hosts_file = write_hosts_file(workdir / "hosts", names)
    return subprocess.run(
        _hosts_command(cmd, hosts_file),
        capture_output=True,
        text=text,
        env=clean_env(env),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_with_hosts(
    cmd: list[str],
    names: list[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with an /etc/hosts in which ``names`` (and localhost) are loopback.

    ``env`` is added to the current environment (proxy variables are dropped). The hosts file
    is written to ``workdir/hosts``. Needs root (mount) and util-linux ``unshare``.
    """
    return _run(cmd, names, workdir, env, timeout, text=True)


class Skopeo:
    """skopeo with TLS verification on, trusting only ``root_pem``, resolving ``names`` locally."""

    def __init__(
        self,
        workdir: Path,
        root_pem: bytes,
        names: list[str],
        *,
        creds: str | None = None,
        timeout: float = 120,
        binary: str = "skopeo",
    ) -> None:
        self.workdir = Path(workdir)
        self.names = list(names)
        self.creds = creds
        self.timeout = timeout
        self.binary = binary

        self.cert_dir = self.workdir / "certs"
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        self.root_file = self.cert_dir / "ca.crt"
        self.root_file.write_bytes(root_pem)
        # containers/image seeds the pool with Go's system roots before adding --cert-dir;
        # pointing SSL_CERT_FILE at our root and SSL_CERT_DIR at nothing leaves only ours.
        self.empty_cert_dir = self.workdir / "no-system-certs"
        self.empty_cert_dir.mkdir(exist_ok=True)
        # Our own policy and auth file keep the host's /etc/containers and ~/.docker out.
        self.policy_file = self.workdir / "policy.json"
        self.policy_file.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.auth_file = self.workdir / "auth.json"
        self.registries_d = self.workdir / "registries.d"
        self.registries_d.mkdir(exist_ok=True)
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text("")
        self.tmp_dir = self.workdir / "tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self.env = {
            "SSL_CERT_FILE": str(self.root_file),
            "SSL_CERT_DIR": str(self.empty_cert_dir),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
        }

    def _cmd(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--policy",
            str(self.policy_file),
            "--registries.d",
            str(self.registries_d),
            "--tmpdir",
            str(self.tmp_dir),
            "--command-timeout",
            f"{int(self.timeout)}s",
            *args,
        ]

    def _run(self, args: list[str], *, text: bool = True) -> subprocess.CompletedProcess[Any]:
        cmd = self._cmd(*args)
        result = _run(cmd, self.names, self.workdir, self.env, self.timeout + 10, text=text)
        if result.returncode != 0:
            stderr = result.stderr if text else result.stderr.decode(errors="replace")
            raise AssertionError(
                f"{shlex.join(cmd)} failed with exit code {result.returncode}:\n{stderr}"
            )
        return result

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Any other skopeo subcommand, with the same trust, hosts and failure handling."""
        return self._run(list(args))

    def _auth(self, flag: str) -> list[str]:
        return [flag, self.creds] if self.creds else []

    def push(self, oci_dir: Path, tag: str, ref: str, *, all_images: bool = False) -> None:
        """Copy ``oci:oci_dir:tag`` to ``docker://ref`` (``all_images``: an index with every
        child, not only this platform's image)."""
        self._run(
            [
                "copy",
                *(["--all"] if all_images else []),
                "--dest-tls-verify=true",
                "--dest-cert-dir",
                str(self.cert_dir),
                *self._auth("--dest-creds"),
                f"oci:{oci_dir}:{tag}",
                f"docker://{ref}",
            ]
        )

    def pull(self, ref: str, oci_dir: Path, tag: str, *, all_images: bool = False) -> None:
        """Copy ``docker://ref`` to ``oci:oci_dir:tag`` (``all_images``: as for push)."""
        self._run(
            [
                "copy",
                *(["--all"] if all_images else []),
                "--src-tls-verify=true",
                "--src-cert-dir",
                str(self.cert_dir),
                *self._auth("--src-creds"),
                f"docker://{ref}",
                f"oci:{oci_dir}:{tag}",
            ]
        )

    def _read_flags(self) -> list[str]:
        return ["--tls-verify=true", "--cert-dir", str(self.cert_dir), *self._auth("--creds")]

    def manifest_raw(self, ref: str) -> bytes:
        # Bytes, not text: the digest is over the exact bytes the registry served.
        return bytes(
            self._run(
                ["inspect", "--raw", *self._read_flags(), f"docker://{ref}"], text=False
            ).stdout
        )

    def manifest_digest(self, ref: str) -> str:
        """``sha256:<hex>`` of the manifest as served, as a registry's Docker-Content-Digest."""
        return "sha256:" + hashlib.sha256(self.manifest_raw(ref)).hexdigest()

    def list_tags(self, repo: str) -> list[str]:
        """Tags of ``repo`` (e.g. ``registry.test:8443/demo``)."""
        out = self._run(["list-tags", *self._read_flags(), f"docker://{repo}"]).stdout
        return list(json.loads(out)["Tags"])


def _tls_handshake(
    host: str, port: int, server_name: str, ca_pem: bytes, timeout: float
) -> tuple[x509.Certificate | None, str]:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:  # ssl.SSLError, refused, reset and timeouts are all OSErrors
        return None, f"{type(exc).__name__}: {exc}"
    if der is None:
        return None, "no peer certificate"
    return x509.load_der_x509_certificate(der), ""


def tls_probe(
    host: str, port: int, server_name: str, ca_pem: bytes, timeout: float = 5
) -> x509.Certificate | None:
    """Verifying handshake (only ``ca_pem`` trusted, hostname checked, SNI ``server_name``).

    Returns the peer's leaf certificate, or None if the connection or verification failed.
    """
    return _tls_handshake(host, port, server_name, ca_pem, timeout)[0]


def wait_for_tls(
    host: str,
    port: int,
    server_name: str,
    ca_pem: bytes,
    timeout: float,
    *,
    accept: Callable[[x509.Certificate], bool] | None = None,
) -> x509.Certificate:
    """Poll every 50 ms until a verifying handshake succeeds and ``accept(cert)`` holds.

    ``accept`` lets a renewal test wait for a certificate other than the one already served.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        remaining = max(0.1, min(5.0, deadline - time.monotonic()))
        cert, error = _tls_handshake(host, port, server_name, ca_pem, remaining)
        if cert is not None:
            if accept is None or accept(cert):
                return cert
            last = f"certificate serial {cert.serial_number:x} not accepted"
        else:
            last = error
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"no verified TLS handshake with {host}:{port} (SNI {server_name}) "
                f"within {timeout} s; last: {last}"
            )
        time.sleep(0.05)


def registry_session(server_name: str, ca_pem: bytes, workdir: Path) -> requests.Session:
    """A requests session that connects to loopback while verifying ``server_name``."""
    from requests.adapters import HTTPAdapter

    class PinnedName(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["server_hostname"] = server_name
            kwargs["assert_hostname"] = server_name
            super().init_poolmanager(*args, **kwargs)

    root = workdir / "registry-session-root.pem"
    workdir.mkdir(parents=True, exist_ok=True)
    root.write_bytes(ca_pem)
    session = requests.Session()
    session.trust_env = False
    session.verify = str(root)
    session.mount("https://", PinnedName())
    return session
