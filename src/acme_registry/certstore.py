"""The certificate/key pair in CERT_DIR: load, judge, and replace it atomically.

Layout (every name in CERT_DIR is relative, so the folder can be mounted anywhere)::

    domain.crt -> live/domain.crt       full chain, leaf first (the tutorials' name)
    domain.key -> live/domain.key       0600
    live -> .generations/<id>           switched by one rename
    .generations/<id>/tls.pem           chain + key in one file: what the registry loads

Because ``domain.crt`` and ``domain.key`` both resolve through the one ``live`` link, a
kill -9 at any instant leaves them matching: the old pair or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import certinfo
from .certinfo import CertInfo
from .storage import ensure_private_dir, fsync_dir, write_atomic

log = logging.getLogger(__name__)

CERT_NAME = "domain.crt"
KEY_NAME = "domain.key"
TLS_NAME = "tls.pem"
LIVE = "live"
GENERATIONS = ".generations"
KEEP_GENERATIONS = 3

# The key types we issue and accept, by the leaf's subjectPublicKeyInfo algorithm.
_RSA = "1.2.840.113549.1.1.1"
_EC = "1.2.840.10045.2.1"
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ((?:[A-Z]+ )*)PRIVATE KEY-----(.*?)-----END", re.DOTALL)


@dataclass(frozen=True)
class CertificatePair:
    """A chain (leaf first) and the private key that matches its leaf, as PEM.

    Only the PEM and the facts read by :mod:`certinfo` are kept: the long-running agent
    must not load ``cryptography`` (see certinfo's docstring).
    """

    chain: tuple[CertInfo, ...]
    chain_pem: bytes
    key_pem: bytes

    @property
    def leaf(self) -> CertInfo:
        return self.chain[0]

    @property
    def fingerprint(self) -> str:
        return self.leaf.fingerprint

    @property
    def names(self) -> frozenset[str]:
        return self.leaf.names

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_before

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_after

    @property
    def issuer(self) -> str:
        return self.leaf.issuer

    @property
    def serial(self) -> int:
        return self.leaf.serial

    def describe(self) -> str:
        return self.leaf.describe()


def parse_pair(chain_pem: bytes, key_pem: bytes) -> CertificatePair:
    """Parse a chain and key; ValueError when either is unreadable or they do not match."""
    try:
        chain = certinfo.load_pem_chain(chain_pem)
    except ValueError as error:
        raise ValueError(f"certificate unreadable: {error}") from None
    key = _PEM_PRIVATE_KEY.search(key_pem)
    if key is None:
        raise ValueError("private key unreadable: no PEM private key found")
    # PKCS#8 "ENCRYPTED PRIVATE KEY", or a traditional key with a Proc-Type header.
    if key.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in key.group(2):
        raise ValueError("private key unreadable: it is encrypted")
    if chain[0].public_key_algorithm not in (_RSA, _EC):
        raise ValueError("private key unreadable: only EC and RSA keys are supported")
    try:
        _server_context(chain_pem, key_pem)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError("the private key does not match the certificate") from None
        raise ValueError(f"certificate or private key refused by OpenSSL: {error}") from None
    return CertificatePair(chain, chain_pem, key_pem)


def _server_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context serving the pair; ssl.SSLError when OpenSSL refuses it.

    OpenSSL checks that the key matches the leaf as it loads them, which spares us the
    public-key arithmetic without cryptography.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _pem_files(chain_pem, key_pem) as (chain_file, key_file):
        # A password, even empty, stops OpenSSL from prompting on a terminal for one.
        context.load_cert_chain(chain_file, key_file, password=b"")
    return context


@contextlib.contextmanager
def _pem_files(*contents: bytes) -> Iterator[list[str]]:
    """File names that read as ``contents``, for ssl calls that only take file names.

    The bytes given, not the files they came from: those may be replaced meanwhile, and
    the check must cover the very bytes that are then saved. On Linux they stay in memory,
    so the private key is not written anywhere new.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for data in contents:
                fds.append(os.memfd_create("acme-registry-pem", os.MFD_CLOEXEC))
                with open(fds[-1], "wb", closefd=False) as handle:
                    handle.write(data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="acme-registry-") as directory:
        paths = []
        for index, data in enumerate(contents):
            path = Path(directory, f"{index}.pem")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(data)
            paths.append(str(path))
        yield paths


def unusable_reason(
    pair: CertificatePair,
    domains: tuple[str, ...],
    now: dt.datetime,
    issued_by: str | None,
    directory: str,
    trust: ssl.SSLContext | None = None,
) -> str | None:
    """Why ``pair`` must not be served for ``domains`` now, or None when it may.

    ``issued_by`` is the ACME directory recorded when this agent stored the pair, or None
    for a pair it did not issue (an existing setup moving over), which must then chain to
    a root ``trust`` accepts: by default the system's (SSL_CERT_FILE / SSL_CERT_DIR are
    honoured).
    """
    if pair.names != frozenset(domains):
        return f"it names {', '.join(sorted(pair.names)) or 'nothing'}, not {', '.join(domains)}"
    if now >= pair.not_after:
        return f"it expired at {pair.not_after:%Y-%m-%d %H:%M} UTC"
    if now < pair.not_before:
        return "it is not valid yet"
    if issued_by is not None:
        if issued_by != directory:
            return f"it was issued through {issued_by}, not the configured {directory}"
        return None
    error = verify_as_client(pair, client_hostname(domains), trust or ssl.create_default_context())
    return f"it does not chain to a trusted root ({error})" if error else None


def client_hostname(domains: Sequence[str]) -> str:
    """A name a client could connect with: the first that is not a wildcard, else one
    label under the wildcard (a client never asks for ``*.example.com`` itself)."""
    for name in domains:
        if not name.startswith("*."):
            return name
    return "registry" + domains[0][1:]


def verify_as_client(pair: CertificatePair, hostname: str, trust: ssl.SSLContext) -> str | None:
    """Serve ``pair`` to a client verifying with ``trust``: its complaint, or None.

    A real handshake in memory, so the chain is judged by the same OpenSSL verification,
    trust store and host-name check as the clients of the registry will use.
    """
    try:
        server_context = _server_context(pair.chain_pem, pair.key_pem)
    except ssl.SSLError as error:
        return f"OpenSSL refused the pair: {error}"
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = trust.wrap_bio(client_in, client_out, server_hostname=hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    # TLS 1.3 completes in one and a half round trips, 1.2 in two: a few turns suffice.
    for _ in range(8):
        try:
            client.do_handshake()
            return None
        except ssl.SSLCertVerificationError as error:
            return error.verify_message or str(error)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as error:
            return str(error)
        server_in.write(client_out.read())
        # The server's own failures reach the client as an alert, and are reported there.
        with contextlib.suppress(ssl.SSLError):
            server.do_handshake()
        client_in.write(server_out.read())
    return "the TLS handshake did not complete"


class CertStore:
    """The served pair in CERT_DIR."""

    def __init__(self, cert_dir: Path) -> None:
        self.dir = cert_dir

    @property
    def tls_file(self) -> Path:
        """The single chain+key file the registry is configured with."""
        return self.dir / LIVE / TLS_NAME

    def load(self) -> CertificatePair | None:
        """The current pair, or None when there is none; ValueError when it is broken."""
        cert, key = self.dir / CERT_NAME, self.dir / KEY_NAME
        if not cert.exists() and not key.exists():
            return None
        try:
            return parse_pair(cert.read_bytes(), key.read_bytes())
        except FileNotFoundError as error:
            raise ValueError(f"{error.filename} is missing") from None

    def load_quietly(self) -> CertificatePair | None:
        """The current pair, or None when there is none or it is broken."""
        try:
            return self.load()
        except ValueError:
            return None

    def save(self, pair: CertificatePair) -> None:
        """Make ``pair`` the current one in a single atomic step."""
        self.adopt()
        generation = self._write_generation(pair)
        self._point_live_at(generation)
        self._link_names()
        self._prune(keep=generation)

    def _write_generation(self, pair: CertificatePair) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        generations = ensure_private_dir(self.dir / GENERATIONS)
        target = generations / f"{stamp}-{pair.fingerprint[:12]}"
        # Partial generations left by a process killed mid-write, or by a full disk.
        for leftover in generations.glob(".*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        building = generations / f".{target.name}.partial"
        try:
            ensure_private_dir(building)
            write_atomic(building / CERT_NAME, pair.chain_pem, mode=0o644)
            write_atomic(building / KEY_NAME, pair.key_pem, mode=0o600)
            write_atomic(building / TLS_NAME, pair.chain_pem.rstrip(b"\n") + b"\n" + pair.key_pem)
            os.chmod(building, 0o755)
            os.replace(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        fsync_dir(generations)
        return target

    def _point_live_at(self, generation: Path) -> None:
        link = self.dir / f".{LIVE}.tmp"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(generation.relative_to(self.dir))
        os.replace(link, self.dir / LIVE)
        fsync_dir(self.dir)

    def _link_names(self) -> None:
        for name in (CERT_NAME, KEY_NAME):
            path = self.dir / name
            wanted = f"{LIVE}/{name}"
            if path.is_symlink() and os.readlink(path) == wanted:
                continue
            tmp = self.dir / f".{name}.tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(wanted)
            os.replace(tmp, path)
        fsync_dir(self.dir)

    def adopt(self) -> None:
        """Turn a plain matching pair (left by certbot or by hand) into a generation.

        The names are then replaced by links one at a time; both files still hold the
        same pair at every step, so they match even if we die between the two renames.
        """
        cert, key = self.dir / CERT_NAME, self.dir / KEY_NAME
        if (cert.is_symlink() and key.is_symlink()) or not (cert.is_file() and key.is_file()):
            return
        try:
            current = parse_pair(cert.read_bytes(), key.read_bytes())
        except ValueError:
            return
        log.info("adopting the existing pair in %s into the managed layout", self.dir)
        self._point_live_at(self._write_generation(current))
        self._link_names()

    def _prune(self, keep: Path) -> None:
        generations = self.dir / GENERATIONS
        old = sorted(p for p in generations.iterdir() if p != keep)
        for path in old[: max(0, len(old) - (KEEP_GENERATIONS - 1))]:
            shutil.rmtree(path, ignore_errors=True)
