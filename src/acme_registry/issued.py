"""Issuance records: which ACME directory issued each certificate we obtained.

The record is written before the pair is switched into CERT_DIR, so a pair there that we
issued always has its record; the agent reads it to refuse, for example, a staging
certificate once ``ACME_DIRECTORY`` points at production. No ``cryptography`` here.
"""

from __future__ import annotations

import datetime as dt

from . import statekeys
from .certstore import CertificatePair, CertStore
from .config import Settings
from .storage import Storage


def store_issued(settings: Settings, storage: Storage, pair: CertificatePair) -> None:
    """Keep a newly issued pair: its record first, then the pair into CERT_DIR."""
    record_issued(settings, storage, pair)
    CertStore(settings.cert_dir).save(pair)


def record_issued(settings: Settings, storage: Storage, pair: CertificatePair) -> None:
    """The issuance record of a newly issued pair (before the pair is served anywhere)."""
    storage.store_json(
        statekeys.issued(pair.fingerprint),
        {
            "directory": settings.directory,
            "issued_at": dt.datetime.now(dt.UTC).isoformat(),
            "names": sorted(pair.names),
        },
    )


def issued_by(storage: Storage, fingerprint: str) -> str | None:
    """The directory URL that issued the certificate with this fingerprint, if we did."""
    record = storage.load_json(statekeys.issued(fingerprint))
    directory = record.get("directory") if record else None
    return directory if isinstance(directory, str) else None
