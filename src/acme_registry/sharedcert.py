"""The current certificate as one shared record, and each replica's local copy of it.

With a shared state store (``STATE_STORE=s3``) every replica serves the pair in one record,
:data:`statekeys.CERTIFICATE`: chain, key and fingerprint, replaced as a whole. The orderer
commits a new one with a conditional write on the version it read before ordering (or only
if absent), so an orderer that lost the issuance lock while it worked cannot overwrite a
newer certificate. The key is in the record, so the record is a secret
(:func:`statekeys.is_secret`): the encrypting wrapper of the store seals it.

CERT_DIR becomes each replica's cache of the record: :class:`CertificateMirror` writes the
record's pair there when the record's version changes, and the agent rotates its registry
onto it as it does after its own renewals. A commit marks the shared state changed
(:mod:`statechanges`): replicas read the record when that mark changes, not every poll.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

from . import statechanges, statekeys
from .certstore import CertificatePair, CertStore, parse_pair
from .storage import Storage, Versioned, json_bytes

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class CertificateRecord:
    """The shared certificate as read, with the store's version of the record."""

    pair: CertificatePair
    directory: str
    committed_at: dt.datetime
    version: str


def encode(pair: CertificatePair, directory: str, committed_at: dt.datetime) -> bytes:
    """The record's bytes: one JSON object naming the pair it holds."""
    value: dict[str, Any] = {
        "format": FORMAT,
        "fingerprint": pair.fingerprint,
        "names": sorted(pair.names),
        "serial": f"{pair.serial:x}",
        "directory": directory,
        "committed_at": committed_at.astimezone(dt.UTC).isoformat(),
        "chain": pair.chain_pem.decode(),
        "key": pair.key_pem.decode(),
    }
    return json_bytes(value)


def decode(found: Versioned) -> CertificateRecord:
    """The record in ``found``; ValueError (one line) when it is not one we wrote."""
    try:
        value = json.loads(found.data)
    except ValueError:
        raise ValueError("the shared certificate record is not JSON") from None
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise ValueError("the shared certificate record has an unknown format")
    chain, key, directory = value.get("chain"), value.get("key"), value.get("directory")
    committed = value.get("committed_at")
    if not all(isinstance(v, str) for v in (chain, key, directory, committed)):
        raise ValueError("the shared certificate record lacks its chain, key or directory")
    assert isinstance(chain, str) and isinstance(key, str) and isinstance(committed, str)
    pair = parse_pair(chain.encode(), key.encode())
    if pair.fingerprint != value.get("fingerprint"):
        raise ValueError("the shared certificate record names another fingerprint")
    try:
        committed_at = dt.datetime.fromisoformat(committed)
    except ValueError:
        raise ValueError("the shared certificate record has a malformed commit time") from None
    if committed_at.tzinfo is None:
        committed_at = committed_at.replace(tzinfo=dt.UTC)
    return CertificateRecord(pair, str(directory), committed_at, found.version)


def load(storage: Storage) -> CertificateRecord | None:
    """The shared record, or None; ValueError when it is malformed, OSError when the store
    cannot be reached."""
    found = storage.load(statekeys.CERTIFICATE)
    return decode(found) if found is not None else None


def commit(
    storage: Storage,
    pair: CertificatePair,
    directory: str,
    read_version: str | None,
    now: dt.datetime,
) -> str:
    """Replace the record read at ``read_version`` (None: there was none) with ``pair``.

    :class:`~.storage.StorageConflict` when the record changed since it was read: another
    orderer committed meanwhile, and its certificate stands.
    """
    data = encode(pair, directory, now)
    if read_version is None:
        version = storage.store(statekeys.CERTIFICATE, data, if_absent=True)
    else:
        version = storage.store(statekeys.CERTIFICATE, data, if_version=read_version)
    statechanges.bump(storage)  # the other replicas look at the record again
    return version


class CertificateMirror:
    """Keeps CERT_DIR at the shared record: one conditional look per :meth:`sync`."""

    def __init__(self, storage: Storage, store: CertStore, domains: tuple[str, ...]) -> None:
        self.storage = storage
        self.store = store
        self.domains = frozenset(domains)
        # The record's version last seen (None: absent or never read), for the child's
        # conditional commit and to skip parsing an unchanged record.
        self.version: str | None = None
        self.seen = False
        self._refused: str | None = None

    def sync(self) -> bool:
        """Read the record; write its pair into CERT_DIR if it is new there. True when
        CERT_DIR changed. OSError when the store cannot be reached."""
        # A conditional GET: an unchanged record costs no body (and no decryption).
        if self.seen:
            changed, found = self.storage.load_if_changed(statekeys.CERTIFICATE, self.version)
        else:
            changed, found = True, self.storage.load(statekeys.CERTIFICATE)
        self.seen = True
        if not changed:
            return False
        if found is None:
            self.version = None
            return False
        try:
            record = decode(found)
        except ValueError as error:
            if self._refused != found.version:
                log.error("%s; keeping the certificate in %s", error, self.store.dir)
                self._refused = found.version
            return False
        self.version = found.version
        if record.pair.names != self.domains:
            # A replica with other ACME_DOMAINS (a rolling update in progress): its
            # certificate would not serve our names.
            if self._refused != found.version:
                log.warning(
                    "the shared certificate names %s, not ACME_DOMAINS; not serving it",
                    ", ".join(sorted(record.pair.names)),
                )
                self._refused = found.version
            return False
        local = self.store.load_quietly()
        if local is not None and local.fingerprint == record.pair.fingerprint:
            return False
        log.info("the shared certificate changed: %s", record.pair.describe())
        self.store.save(record.pair)
        return True
