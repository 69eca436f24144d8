"""A real Pebble ACME server (with pebble-challtestsrv as its DNS) on loopback, for tests."""

from __future__ import annotations

import base64
import datetime
import functools
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import requests
from cryptography import x509

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port, free_tcp_udp_port
from tests.support.tls import TestCA

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where scripts/install-pebble-sid.sh unpacks Pebble 2.10 from Debian sid (bookworm's 2.4.0
# has no ARI and no profiles). The variable lets a machine keep one copy for many checkouts.
PEBBLE_SID_DIR = Path(
    os.environ.get("ACME_REGISTRY_TEST_PEBBLE_SID_DIR", REPO_ROOT / ".cache" / "pebble-sid")
)
PEBBLE_SID_BINARY = PEBBLE_SID_DIR / "usr" / "bin" / "pebble"
PEBBLE_SID_INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-pebble-sid.sh"

# Pebble 2.10 profiles for ``config_overrides={"profiles": PEBBLE_PROFILES}``. With profiles
# configured, an order that names none gets one at RANDOM: tests must always send one.
# A "shortlived" certificate is valid for validityPeriod - 1 s (notAfter is inclusive).
SHORTLIVED_SECONDS = 60
PEBBLE_PROFILES: dict[str, dict[str, Any]] = {
    "default": {"description": "90 days", "validityPeriod": 90 * 24 * 3600},
    "shortlived": {
        "description": f"{SHORTLIVED_SECONDS} seconds",
        "validityPeriod": SHORTLIVED_SECONDS,
    },
}
# Pebble 2.10 answers every renewalInfo GET with this Retry-After, whatever
# /set-renewal-info/ said: a client honouring it re-checks only after six hours.
ARI_RETRY_AFTER_SECONDS = 6 * 3600

START_TIMEOUT = 10.0
STOP_GRACE = 5.0
LOG_TAIL_CHARS = 4000

# Pebble logs every request it routes ("POST /order-plz -> calling handler()") before checking
# the JWS, so this also counts requests it then rejected (badNonce, malformed, EAB problems).
_NEW_ORDER_LINE = re.compile(r"POST /order-plz\b.*calling handler", re.MULTILINE)
# Logged only once an order really exists: unaffected by the client's badNonce retries.
_ORDER_ADDED_LINE = re.compile(r'Added order "[^"]*" to the db', re.MULTILINE)
# 2.10 logs this when it accepts a new order whose "replaces" names an earlier certificate.
_REPLACEMENT_LINE = re.compile(
    r'ARI: order "(?P<order>[^"]+)" is a replacement of "(?P<replaced>[^"]+)"', re.MULTILINE
)


def pebble_sid_binary(*, install: bool = False) -> str:
    """Path of Pebble 2.10's binary, unpacked by scripts/install-pebble-sid.sh.

    ``install=True`` runs the (idempotent, root-only) script when the binary is missing, for
    callers that cannot rely on ``make test`` having done it. Raises FileNotFoundError with
    the command to run otherwise.
    """
    if not os.access(PEBBLE_SID_BINARY, os.X_OK) and install:
        subprocess.run(
            [str(PEBBLE_SID_INSTALL_SCRIPT), str(PEBBLE_SID_DIR)],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
    if not os.access(PEBBLE_SID_BINARY, os.X_OK):
        raise FileNotFoundError(
            f"Pebble 2.10 not found at {PEBBLE_SID_BINARY}: run "
            f"{PEBBLE_SID_INSTALL_SCRIPT.relative_to(REPO_ROOT)} as root (make test does)"
        )
    return str(PEBBLE_SID_BINARY)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pebble_finds_replaced(cert_id: str) -> bool:
    """Whether Pebble can find the certificate an RFC 9773 CertID names in a ``replaces``.

    Pebble keys issued orders by the hex of the serial's magnitude (Go's ``big.Int.Bytes``)
    but looks a ``replaces`` up by the hex of the CertID's serial bytes, which RFC 9773 makes
    the DER INTEGER content: a serial whose top bit is set carries a leading zero byte there
    (the RFC's own example, ``AIdlQyE``), and Pebble answers "could not find an order for the
    given certificate" (serverInternal). Our CertIDs follow the RFC (tests/unit/test_ari.py);
    Boulder decodes the serial as a number and finds it. Tests that count accepted
    replacements ask this first, instead of failing on the serials Pebble cannot look up.
    """
    serial = base64.urlsafe_b64decode(cert_id.split(".")[1] + "==")
    return not serial.startswith(b"\x00")


def ari_cert_id(cert_pem: bytes) -> str:
    """RFC 9773 CertID of the first certificate in ``cert_pem`` (a leaf or a full chain).

    base64url(AKI keyIdentifier) "." base64url(DER INTEGER content of the serial), unpadded.
    Written apart from acme_registry so a bug there cannot hide in the tests' expectations.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    key_id = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if key_id.key_identifier is None:
        raise ValueError("certificate's Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    # DER is two's complement: a serial whose top bit is set gets a leading zero byte.
    serial_der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    return f"{_b64url(key_id.key_identifier)}.{_b64url(serial_der)}"


def _rfc3339(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        # acme's renewal_time() hands out naive LOCAL times; guessing would shift windows.
        raise ValueError(f"naive datetime {moment!r}: give a timezone-aware one")
    utc = moment.astimezone(datetime.UTC)
    spec = "microseconds" if utc.microsecond else "seconds"
    return utc.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _write_tls_material(tls_dir: Path) -> tuple[Path, Path, Path]:
    """Make a CA and a localhost/127.0.0.1 leaf for Pebble's own HTTPS listeners.

    Debian ships no certificate for Pebble; a fresh CA per instance means a client can only
    trust this Pebble through the bundle the test hands it.
    """
    tls_dir.mkdir(parents=True, exist_ok=True)
    ca = TestCA("acme-registry test Pebble CA")
    leaf_pem, key_pem = ca.issue_pair(["localhost"], ["127.0.0.1"])
    ca_path, cert_path, key_path = tls_dir / "ca.pem", tls_dir / "cert.pem", tls_dir / "key.pem"
    ca_path.write_bytes(ca.pem)
    cert_path.write_bytes(leaf_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no log>"
    return text[-chars:]


def _session() -> requests.Session:
    session = requests.Session()
    # Pebble is on loopback; an inherited HTTPS_PROXY without NO_PROXY would route there.
    session.trust_env = False
    return session


def _stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@functools.cache
def _challtestsrv_flags(binary: str) -> frozenset[str]:
    """The flags a pebble-challtestsrv build accepts (they were renamed between releases)."""
    result = subprocess.run(
        [binary, "-h"], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    return frozenset(re.findall(r"^\s+(-[\w-]+)", result.stdout + result.stderr, re.MULTILINE))


def _challtestsrv_command(binary: str, dns_server: str, management_port: int) -> list[str]:
    """Only the DNS server on our port: every other listener off, whatever the release.

    2.4.0 calls the DNS flag -dns01; 2.10 calls it -dnsserver and adds a DNS-over-HTTPS
    listener that defaults to :8443 on all interfaces, so it must be switched off explicitly.
    """
    flags = _challtestsrv_flags(binary)
    cmd = [binary, "-dnsserver" if "-dnsserver" in flags else "-dns01", dns_server]
    for listener in ("-http01", "-https01", "-tlsalpn01", "-doh"):
        if listener in flags:
            cmd += [listener, ""]
    return [
        *cmd,
        "-management",
        f"127.0.0.1:{management_port}",
        "-defaultIPv4",
        "127.0.0.1",
        "-defaultIPv6",
        "",
    ]


class Pebble(StartStop):
    """Pebble plus its own pebble-challtestsrv, both on loopback with ports chosen at start.

    Every DNS name resolves to 127.0.0.1 for Pebble's validator, so HTTP-01 for any name is
    answered by whatever the test runs on 127.0.0.1:``http_port``.
    """

    def __init__(
        self,
        workdir: Path,
        http_port: int,
        *,
        eab_keys: dict[str, str] | None = None,
        nonce_reject: int | None = None,
        binary: str = "/usr/bin/pebble",
        challtestsrv_binary: str | None = None,
        env: dict[str, str] | None = None,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        """Describe an instance; nothing runs until ``start()``.

        ``challtestsrv_binary`` defaults to the pebble-challtestsrv next to ``binary`` (so an
        unpacked newer Pebble brings its own), else /usr/bin/pebble-challtestsrv.
        ``env`` adds Pebble environment variables (e.g. PEBBLE_AUTHZREUSE);
        ``config_overrides`` is merged into the "pebble" config object (e.g. "profiles").
        """
        self.workdir = Path(workdir).resolve()
        self.http_port = http_port
        self.eab_keys = dict(eab_keys) if eab_keys else None
        self.nonce_reject = nonce_reject
        self.binary = binary
        if challtestsrv_binary is None:
            sibling = Path(binary).with_name("pebble-challtestsrv")
            challtestsrv_binary = (
                str(sibling) if sibling.exists() else "/usr/bin/pebble-challtestsrv"
            )
        self.challtestsrv_binary = challtestsrv_binary
        self.extra_env = dict(env) if env else {}
        self.config_overrides = dict(config_overrides) if config_overrides else {}

        self.log_path = self.workdir / "pebble.log"
        self.challtestsrv_log_path = self.workdir / "challtestsrv.log"
        self.config_path = self.workdir / "pebble-config.json"
        self.ca_bundle = self.workdir / "tls" / "ca.pem"

        self.listen_port = 0
        self.management_port = 0
        self.dns_port = 0
        self.challtestsrv_management_port = 0
        self._pebble: subprocess.Popen[bytes] | None = None
        self._challtestsrv: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Pebble:
        if self._pebble is not None:
            raise RuntimeError("Pebble already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca_bundle, cert_path, key_path = _write_tls_material(self.workdir / "tls")
        self.listen_port = free_port()
        self.management_port = free_port()
        self.dns_port = free_tcp_udp_port()
        self.challtestsrv_management_port = free_port()
        self._write_config(cert_path, key_path)
        try:
            self._start_challtestsrv()
            self._start_pebble()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate both processes; safe to call more than once."""
        _stop_process(self._pebble)
        _stop_process(self._challtestsrv)
        for log in self._logs:
            log.close()
        self._logs.clear()

    # -- addresses -------------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.listen_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    @property
    def dns_server(self) -> str:
        """host:port of the challtestsrv DNS that Pebble's validator uses."""
        return f"127.0.0.1:{self.dns_port}"

    # -- queries ---------------------------------------------------------------------------

    def root_pem(self) -> bytes:
        """The root that signs issued certificates (a fresh one per Pebble process)."""
        with _session() as session:
            resp = session.get(
                f"{self.management_url}/roots/0", verify=str(self.ca_bundle), timeout=5
            )
        resp.raise_for_status()
        return resp.content

    def write_root(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.root_pem())
        return path

    def log_text(self) -> str:
        for log in self._logs:
            log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def order_count(self) -> int:
        """New-order requests received, including ones Pebble rejected (e.g. badNonce).

        With nonce rejection on, a correct client that retries a rejected new-order is counted
        twice: assert exact numbers with ``orders_created()`` instead.
        """
        return len(_NEW_ORDER_LINE.findall(self.log_text()))

    def orders_created(self) -> int:
        """Orders Pebble accepted and stored."""
        return len(_ORDER_ADDED_LINE.findall(self.log_text()))

    def replacements(self) -> list[tuple[str, str]]:
        """(new order ID, replaced order ID) for each order accepted with ``replaces`` (2.10).

        Logged at new-order time, so an order later abandoned before finalize is counted too.
        """
        return [(m["order"], m["replaced"]) for m in _REPLACEMENT_LINE.finditer(self.log_text())]

    def directory(self) -> dict[str, Any]:
        """The ACME directory (2.10 adds "renewalInfo" and meta "profiles")."""
        with _session() as session:
            resp = session.get(self.directory_url, verify=str(self.ca_bundle), timeout=5)
        resp.raise_for_status()
        return dict(resp.json())

    # -- ARI (Pebble 2.10) -----------------------------------------------------------------

    def renewal_info_url(self, cert_pem: bytes) -> str:
        base = self.directory().get("renewalInfo")
        if not base:
            raise RuntimeError(f"{self.binary} offers no renewalInfo (ARI needs Pebble >= 2.8)")
        return f"{str(base).rstrip('/')}/{ari_cert_id(cert_pem)}"

    def renewal_info_response(self, cert_pem: bytes) -> requests.Response:
        """The raw ARI GET a client makes (status, Retry-After, body), not raised on error."""
        with _session() as session:
            return session.get(
                self.renewal_info_url(cert_pem), verify=str(self.ca_bundle), timeout=5
            )

    def renewal_info(self, cert_pem: bytes) -> dict[str, Any]:
        """The ARI answer for ``cert_pem``: {"suggestedWindow": {"start", "end"}, ...}."""
        resp = self.renewal_info_response(cert_pem)
        resp.raise_for_status()
        return dict(resp.json())

    def set_renewal_info(
        self,
        cert_pem: bytes,
        window_start: datetime.datetime,
        window_end: datetime.datetime,
        explanation_url: str | None = None,
    ) -> None:
        """Make renewalInfo for ``cert_pem`` answer this window from now on (2.10).

        Takes effect at once for every later GET; Retry-After stays six hours. Times must
        be timezone-aware. Pebble keys the override on the certificate's serial.
        """
        answer: dict[str, Any] = {
            "suggestedWindow": {"start": _rfc3339(window_start), "end": _rfc3339(window_end)}
        }
        if explanation_url is not None:
            answer["explanationURL"] = explanation_url
        self.set_renewal_info_raw(cert_pem, json.dumps(answer))

    def set_renewal_info_raw(self, cert_pem: bytes, ari_response: str) -> None:
        """Serve ``ari_response`` verbatim as the renewalInfo body for ``cert_pem``.

        Pebble does not check it, so this can feed a client malformed or inverted windows.
        """
        body = {"Certificate": cert_pem.decode("ascii"), "ARIResponse": ari_response}
        with _session() as session:
            resp = session.post(
                f"{self.management_url}/set-renewal-info/",
                json=body,
                verify=str(self.ca_bundle),
                timeout=5,
            )
        if resp.status_code != 200:
            raise RuntimeError(f"set-renewal-info: HTTP {resp.status_code}: {resp.text[:300]}")

    # -- internals -------------------------------------------------------------------------

    def _write_config(self, cert_path: Path, key_path: Path) -> None:
        pebble: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.listen_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert_path),
            "privateKey": str(key_path),
            "httpPort": self.http_port,
            # Nothing here answers TLS-ALPN-01; a port nobody listens on makes such a
            # validation fail fast instead of hitting an unrelated local service.
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(self.eab_keys),
        }
        if self.eab_keys:
            pebble["externalAccountMACKeys"] = self.eab_keys
        pebble.update(self.config_overrides)
        self.config_path.write_text(json.dumps({"pebble": pebble}, indent=2))

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # An inherited value would silently change the rejection rate the test asked for.
        env.pop("PEBBLE_WFE_NONCEREJECT", None)
        # Without this Pebble sleeps 0-4 s before every validation.
        env["PEBBLE_VA_NOSLEEP"] = "1"
        if self.nonce_reject is not None:
            env["PEBBLE_WFE_NONCEREJECT"] = str(self.nonce_reject)
        env.update(self.extra_env)
        return env

    def _open_log(self, path: Path) -> IO[bytes]:
        log = path.open("ab")
        self._logs.append(log)
        return log

    def _start_challtestsrv(self) -> None:
        log = self._open_log(self.challtestsrv_log_path)
        self._challtestsrv = subprocess.Popen(
            _challtestsrv_command(
                self.challtestsrv_binary, self.dns_server, self.challtestsrv_management_port
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._challtestsrv.poll() is not None:
                raise RuntimeError(
                    f"pebble-challtestsrv exited with {self._challtestsrv.returncode}:\n"
                    f"{_tail(self.challtestsrv_log_path)}"
                )
            # The management listener comes up after the DNS one, so it marks "ready".
            try:
                socket.create_connection(
                    ("127.0.0.1", self.challtestsrv_management_port), timeout=0.5
                ).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "pebble-challtestsrv did not come up within "
                    f"{START_TIMEOUT} s:\n{_tail(self.challtestsrv_log_path)}"
                )
            time.sleep(0.05)

    def _start_pebble(self) -> None:
        log = self._open_log(self.log_path)
        self._pebble = subprocess.Popen(
            [self.binary, "-config", str(self.config_path), "-dnsserver", self.dns_server],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self._env(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        last_error = ""
        while True:
            if self._pebble.poll() is not None:
                raise RuntimeError(
                    f"pebble exited with {self._pebble.returncode}:\n{_tail(self.log_path)}"
                )
            try:
                with _session() as session:
                    resp = session.get(self.directory_url, verify=str(self.ca_bundle), timeout=1)
                if resp.status_code == 200 and "newOrder" in resp.json():
                    return
                last_error = f"HTTP {resp.status_code}"
            except (requests.RequestException, ValueError) as exc:
                last_error = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Pebble directory {self.directory_url} not answering within "
                    f"{START_TIMEOUT} s (last: {last_error}):\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)


# What the ``pebble_factory`` fixture returns: ``make(http_port, **Pebble kwargs) -> Pebble``.
PebbleFactory = Callable[..., Pebble]
