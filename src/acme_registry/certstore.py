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
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification

from . import keys
from .storage import ensure_private_dir, fsync_dir, write_atomic

log = logging.getLogger(__name__)

CERT_NAME = "domain.crt"
KEY_NAME = "domain.key"
TLS_NAME = "tls.pem"
LIVE = "live"
GENERATIONS = ".generations"
KEEP_GENERATIONS = 3


@dataclass(frozen=True)
class CertificatePair:
    """A parsed chain (leaf first) and the private key that matches its leaf."""

    chain: tuple[x509.Certificate, ...]
    key: keys.PrivateKey
    chain_pem: bytes
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def fingerprint(self) -> str:
        return keys.fingerprint(self.leaf)

    @property
    def names(self) -> frozenset[str]:
        return keys.dns_names(self.leaf)

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def issuer(self) -> str:
        return self.leaf.issuer.rfc4514_string()

    def describe(self) -> str:
        return (
            f"serial {self.leaf.serial_number:x} for {', '.join(sorted(self.names))}, "
            f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC"
        )


def parse_pair(chain_pem: bytes, key_pem: bytes) -> CertificatePair:
    """Parse a chain and key; ValueError when either is unreadable or they do not match."""
    try:
        chain = tuple(x509.load_pem_x509_certificates(chain_pem))
    except ValueError as error:
        raise ValueError(f"certificate unreadable: {error}") from None
    try:
        key = keys.load_key(key_pem)
    except (ValueError, TypeError) as error:
        raise ValueError(f"private key unreadable: {error}") from None
    if not keys.public_key_matches(chain[0], key):
        raise ValueError("the private key does not match the certificate")
    return CertificatePair(chain, key, chain_pem, key_pem)


def unusable_reason(
    pair: CertificatePair,
    domains: tuple[str, ...],
    now: dt.datetime,
    issued_by: str | None,
    directory: str,
    trusted_roots: list[x509.Certificate] | None = None,
) -> str | None:
    """Why ``pair`` must not be served for ``domains`` now, or None when it may.

    ``issued_by`` is the ACME directory recorded when this agent stored the pair, or None
    for a pair it did not issue (an existing setup moving over), which must then chain to
    ``trusted_roots``.
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
    if trusted_roots is None:
        trusted_roots = system_roots()
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(trusted_roots))
            .time(now)
            .build_server_verifier(x509.DNSName(domains[0]))
        )
        verifier.verify(pair.leaf, list(pair.chain[1:]))
    except (verification.VerificationError, ValueError) as error:
        return f"it does not chain to a trusted root ({error})"
    return None


def system_roots() -> list[x509.Certificate]:
    """The machine's trusted roots (SSL_CERT_FILE / SSL_CERT_DIR are honoured)."""
    paths = ssl.get_default_verify_paths()
    files: list[Path] = []
    if paths.cafile:
        files.append(Path(paths.cafile))
    if paths.capath and Path(paths.capath).is_dir():
        files.extend(sorted(Path(paths.capath).glob("*.pem")))
    roots: list[x509.Certificate] = []
    for path in files:
        with contextlib.suppress(OSError, ValueError):
            roots.extend(x509.load_pem_x509_certificates(path.read_bytes()))
    return roots


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
