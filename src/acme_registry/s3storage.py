""":class:`~.storage.Storage` on an S3-compatible bucket, for replicas that share one state.

The only module that imports boto3, and it is imported only with ``STATE_STORE=s3``
(:mod:`statestore`): boto3 costs tens of MiB resident that the file store must not pay.

- A version is the object's ETag. ``store(if_absent=True)`` is PutObject with
  ``If-None-Match: *``, ``store(if_version=E)`` PutObject with ``If-Match: E``; 412 is
  :class:`~.storage.StorageConflict`. ``delete(if_version=E)`` is DeleteObject with
  ``If-Match``; on a server without conditional deletes (found by the probe) it is a
  conditional overwrite with a tombstone, then a plain delete: between the two the key reads
  as absent, and a tombstone left behind by a crash is taken for absent too (load, list,
  ``if_absent`` stores replace it conditionally).
- :func:`probe_conditional_writes` runs once per agent start: a store that ignores the
  conditions would let two replicas both "win" and order twice, so it refuses to run.
- Connection errors, timeouts, 5xx and refused credentials are
  :class:`~.storage.StoreUnavailable`: short timeouts and one retry, so a dead store costs
  seconds, never a hung agent.

The lock (:class:`S3Lock`) is the issue's design: created with ``If-None-Match: *``; every
write carries the holder, a sequence number and a nonce, so its body and thus its ETag (the
body's MD5 on S3) always change; renewed with ``If-Match`` on its own ETag; stale when the
server's ``Date`` minus the object's ``Last-Modified`` exceeds the lease (the server's clock
alone, so replicas' clocks do not matter); taken over with ``If-Match`` on the stale ETag;
released by a conditional overwrite with a "released" body, never a delete that could remove
another holder's lock.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from . import statekeys
from .storage import (
    DEFAULT_LEASE,
    Lock,
    LockLost,
    LockTimeout,
    Storage,
    StorageConflict,
    StoreUnavailable,
    StoreUnsafe,
    Versioned,
    new_holder_id,
)

if TYPE_CHECKING:
    from .stateconfig import S3Location

log = logging.getLogger(__name__)

# Fail fast: the agent must learn "store down" in seconds and keep serving from its cache.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
MAX_ATTEMPTS = 2  # the first try and one retry
# A body no stored value can equal (values are JSON, PEM or ciphertext with a magic prefix).
TOMBSTONE_MAGIC = b"acme-registry tombstone "
TOMBSTONE_SIZE = len(TOMBSTONE_MAGIC) + 32  # the magic and a hex nonce
PROBE_PREFIX = "probe"
RELEASED = "released"
HELD = "held"


def make_client(
    location: S3Location,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    attempts: int = MAX_ATTEMPTS,
) -> Any:
    """A boto3 S3 client for ``location``: path-style, checksums only where required.

    boto3 >= 1.36 adds CRC checksums to every PutObject and validates them on GET by
    default; several S3-compatible servers reject or mangle those, so both are limited to
    the operations that require them. Path-style addressing: bucket names in the path, as
    MinIO, SeaweedFS and Ceph expect without wildcard DNS.
    """
    config = botocore.config.Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path" if location.endpoint else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=location.access_key,
        aws_secret_access_key=location.secret_key,
        region_name=location.region,
    )
    return session.client("s3", endpoint_url=location.endpoint, config=config)


class _Unchanged(Exception):
    """A conditional GET's 304: the object is still at the version given."""


@dataclass(frozen=True)
class _Object:
    """One GET: the body and what the lock needs to judge staleness by the server's clock."""

    data: bytes
    etag: str
    last_modified: dt.datetime
    server_date: dt.datetime | None


class S3Storage(Storage):
    """Keys of :mod:`statekeys` under ``location.prefix`` in ``location.bucket``.

    ``client``: a boto3 S3 client of :func:`make_client` (its timeouts and retries bound how
    long a call can take with the store down); one is made for ``location`` by default.
    """

    def __init__(self, location: S3Location, client: Any = None) -> None:
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.client = client if client is not None else make_client(location)
        # Set by probe_conditional_writes; True until a probe finds otherwise.
        self.conditional_delete = True
        # Whether the conditions were probed; the first conditional write probes if not
        # (a store down when the agent started is probed once it answers).
        self.probed = False
        self._probe_guard = threading.Lock()

    def ensure_safe(self) -> None:
        """Probe the conditions once (:class:`StoreUnsafe` if ignored)."""
        if self.probed:
            return
        with self._probe_guard:
            if not self.probed:
                probe_conditional_writes(self)

    # -- keys and errors ---------------------------------------------------------------

    def _key(self, key: str) -> str:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.prefix + key

    def where(self, key: str) -> str:
        return f"{self.location.url()}{key}"

    def _unavailable(self, error: Exception, action: str, key: str) -> StoreUnavailable:
        if isinstance(error, botocore.exceptions.ClientError):
            meta = error.response.get("ResponseMetadata", {})
            code = error.response.get("Error", {}).get("Code", "?")
            why = f"HTTP {meta.get('HTTPStatusCode', '?')} {code}"
        else:
            why = str(error) or type(error).__name__
        return StoreUnavailable(f"state store: {action} {self.where(key)} failed: {why}")

    @staticmethod
    def _status(error: botocore.exceptions.ClientError) -> int:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(status or 0)

    @staticmethod
    def _code(error: botocore.exceptions.ClientError) -> str:
        return str(error.response.get("Error", {}).get("Code", ""))

    # -- raw object operations ---------------------------------------------------------

    def _get(self, key: str, if_none_match: str | None = None) -> _Object | None:
        """The object, or None when absent; :class:`_Unchanged` on a 304."""
        condition = {"IfNoneMatch": if_none_match} if if_none_match else {}
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **condition)
            data = response["Body"].read()
        except botocore.exceptions.ClientError as error:
            if self._status(error) == 404 or self._code(error) in ("NoSuchKey", "NotFound"):
                return None
            if if_none_match and self._status(error) == 304:
                raise _Unchanged from None
            raise self._unavailable(error, "reading", key) from error
        except botocore.exceptions.BotoCoreError as error:
            raise self._unavailable(error, "reading", key) from error
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return _Object(
            data=data,
            etag=response["ETag"],
            last_modified=response["LastModified"],
            server_date=_http_date(headers.get("date")),
        )

    def _put(self, key: str, data: bytes, **condition: str) -> str:
        """PutObject; 412 -> StorageConflict. ``condition``: IfNoneMatch or IfMatch."""
        try:
            response = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, **condition
            )
        except botocore.exceptions.ClientError as error:
            if self._status(error) == 412 or self._code(error) == "PreconditionFailed":
                expected = "absent" if "IfNoneMatch" in condition else "at the version read"
                raise StorageConflict(key, expected) from None
            if self._code(error) == "ConditionalRequestConflict":  # 409: a racing write
                raise StorageConflict(key, "written by one writer at a time") from None
            raise self._unavailable(error, "writing", key) from error
        except botocore.exceptions.BotoCoreError as error:
            raise self._unavailable(error, "writing", key) from error
        return str(response["ETag"])

    def _delete(self, key: str, **condition: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **condition)
        except botocore.exceptions.ClientError as error:
            status = self._status(error)
            if condition and (status in (404, 412) or self._code(error) == "PreconditionFailed"):
                raise StorageConflict(key, "at the version read") from None
            if not condition and status == 404:
                return
            raise self._unavailable(error, "deleting", key) from error
        except botocore.exceptions.BotoCoreError as error:
            raise self._unavailable(error, "deleting", key) from error

    # -- the Storage protocol ----------------------------------------------------------

    def load(self, key: str) -> Versioned | None:
        found = self._get(key)
        if found is None or _is_tombstone(found.data):
            return None
        return Versioned(found.data, found.etag)

    def load_if_changed(self, key: str, version: str | None) -> tuple[bool, Versioned | None]:
        if version is None:
            found = self.load(key)
            return found is not None, found
        try:
            current = self._get(key, if_none_match=version)
        except _Unchanged:
            return False, None
        if current is None or _is_tombstone(current.data):
            return True, None
        return True, Versioned(current.data, current.etag)

    def store(
        self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> str:
        if if_absent and if_version is not None:
            raise ValueError("store: if_absent and if_version exclude each other")
        if if_absent or if_version is not None:
            self.ensure_safe()
        if if_version is not None:
            return self._put(key, data, IfMatch=if_version)
        if not if_absent:
            return self._put(key, data)
        try:
            return self._put(key, data, IfNoneMatch="*")
        except StorageConflict:
            # A tombstone a crashed delete left behind is "absent": replace exactly it.
            found = self._get(key)
            if found is None or not _is_tombstone(found.data):
                raise
            return self._put(key, data, IfMatch=found.etag)

    def delete(self, key: str, *, if_version: str | None = None) -> None:
        if if_version is None:
            self._delete(key)
            return
        self.ensure_safe()
        if self.conditional_delete:
            self._delete(key, IfMatch=if_version)
            return
        # No conditional DELETE on this server: make the key absent with a conditional write
        # first (only the version read can be replaced), then remove the tombstone.
        self._put(key, _tombstone(), IfMatch=if_version)
        self._delete(key)

    def list(self, prefix: str) -> list[str]:
        directory = self._key(prefix) + "/"
        keys: list[str] = []
        for entry in self._list_objects(directory, prefix):
            name = entry["Key"][len(self.prefix) :]
            if entry.get("Size") == TOMBSTONE_SIZE and self.load(name) is None:
                continue
            keys.append(name)
        return sorted(keys)

    def _list_objects(self, directory: str, prefix: str) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            try:
                page = self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=directory, Delimiter="/", **extra
                )
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                raise self._unavailable(error, "listing", prefix) from error
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def lock(
        self,
        name: str,
        holder: str | None = None,
        lease: float = DEFAULT_LEASE,
        timeout: float | None = None,
        *,
        keep_alive: bool = True,
    ) -> S3Lock:
        """Wait for the lock; ``keep_alive`` renews it from a thread every third of the
        lease until it is released (off only in tests that play a silent holder)."""
        self.ensure_safe()
        held = S3Lock(self, name, holder or new_holder_id(), lease)
        held.acquire(timeout)
        if keep_alive:
            held.start_keep_alive()
        return held


class S3Lock(Lock):
    """The lock object ``locks/<name>``: JSON with holder, seq, nonce, state and lease."""

    def __init__(self, storage: S3Storage, name: str, holder: str, lease: float) -> None:
        super().__init__(name, holder, lease)
        self._storage = storage
        self._key = statekeys.lock(name)
        self._etag: str | None = None
        self._seq = 0
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # monotonic instant of the last write that the server accepted as ours
        self._confirmed = 0.0

    @property
    def sequence(self) -> int:
        return self._seq

    def _body(self, state: str) -> bytes:
        record = {
            "holder": self.holder,
            "seq": self._seq,
            "nonce": secrets.token_hex(8),
            "state": state,
            "lease": self.lease,
        }
        return json.dumps(record, sort_keys=True).encode()

    def acquire(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = min(1.0, max(0.1, self.lease / 10))
        while True:
            holder = self._try_acquire()
            if holder is None:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(
                    f"lock {self.name!r} is still held by {holder} after {timeout:g} s"
                )
            # Never negative: the deadline may pass between the check above and this line
            # (the issuer waits in slices of a poll interval, so this is no rare corner).
            time.sleep(
                pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic()))
            )

    def _try_acquire(self) -> str | None:
        """Take the lock if free, released or stale; else the current holder's id."""
        self._seq = 1
        started = time.monotonic()
        try:
            self._etag = self._storage._put(self._key, self._body(HELD), IfNoneMatch="*")
            self._confirmed = started
            return None
        except StorageConflict:
            pass
        current = self._storage._get(self._key)
        if current is None:
            return "nobody (it was just removed)"  # try creating it again
        record = _record(current.data)
        holder = str(record.get("holder", "an unknown holder"))
        free = record.get("state") == RELEASED or _is_tombstone(current.data)
        if not free and not _stale(current, _lease_of(record, self.lease)):
            return holder
        self._seq = _sequence(record) + 1
        started = time.monotonic()
        try:
            self._etag = self._storage._put(self._key, self._body(HELD), IfMatch=current.etag)
        except StorageConflict:
            return holder  # another replica took it over first
        self._confirmed = started
        if not free:
            log.warning("lock %r: took over from %s, silent beyond its lease", self.name, holder)
        return None

    def renew(self) -> None:
        with self._guard:
            if self._etag is None:
                raise LockLost(f"lock {self.name!r} was released")
            if self.lost.is_set():
                raise LockLost(f"lock {self.name!r} was taken over by another holder")
            self._seq += 1
            started = time.monotonic()
            try:
                self._etag = self._storage._put(self._key, self._body(HELD), IfMatch=self._etag)
            except StorageConflict:
                self.lost.set()
                raise LockLost(f"lock {self.name!r} was taken over by another holder") from None
            except StoreUnavailable:
                if time.monotonic() - self._confirmed > self.lease:
                    # Unconfirmed for a whole lease: another replica may hold it by now.
                    self.lost.set()
                raise
            self._confirmed = started

    def release(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._guard:
            etag, self._etag = self._etag, None
            if etag is None or self.lost.is_set():
                return
            self._seq += 1
            try:
                self._storage._put(self._key, self._body(RELEASED), IfMatch=etag)
            except StorageConflict:
                # Not ours any more: leave the new holder's lock alone.
                self.lost.set()
            except StoreUnavailable as error:
                # The lease runs out on its own; the next holder takes the lock over then.
                log.warning(
                    "lock %r: release failed (%s); it expires with its lease", self.name, error
                )

    def start_keep_alive(self) -> None:
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"lock-{self.name}", daemon=True
        )
        self._thread.start()

    def _keep_alive(self) -> None:
        interval = self.lease / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LockLost:
                log.error("lock %r lost: another replica holds it now", self.name)
                return
            except StoreUnavailable as error:
                log.warning("lock %r: renewal failed: %s", self.name, error)


def probe_conditional_writes(storage: S3Storage) -> None:
    """Refuse a store that ignores conditional writes (:class:`StoreUnsafe`).

    A second ``If-None-Match: *`` create of one key and an ``If-Match`` with a wrong ETag
    must both get 412. A conditional DELETE with a wrong ETag is tried too: a server that
    refuses it keeps ``storage.conditional_delete``; one that deletes anyway (or does not
    know the header) gets tombstone deletes instead.
    """
    where = storage.location.endpoint or "the AWS endpoint"
    key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    storage._put(key, b"probe 1", IfNoneMatch="*")
    try:
        try:
            storage._put(key, b"probe 2", IfNoneMatch="*")
        except StorageConflict:
            pass
        else:
            raise StoreUnsafe(
                f"the S3 server at {where} ignores If-None-Match: refusing to run (STATE_STORE=s3)"
            )
        try:
            storage._put(key, b"probe 3", IfMatch='"00000000000000000000000000000000"')
        except StorageConflict:
            pass
        else:
            raise StoreUnsafe(
                f"the S3 server at {where} ignores If-Match: refusing to run (STATE_STORE=s3)"
            )
        storage.conditional_delete = _deletes_conditionally(storage, key)
        if not storage.conditional_delete:
            log.info("the S3 server at %s has no conditional DELETE: using tombstones", where)
        storage.probed = True
    finally:
        storage._delete(key)


def _deletes_conditionally(storage: S3Storage, key: str) -> bool:
    try:
        storage._delete(key, IfMatch='"00000000000000000000000000000000"')
    except StorageConflict:
        return True
    except StoreUnavailable:
        return False  # e.g. 501 NotImplemented for the header
    return False  # it deleted despite the wrong ETag


def _stale(current: _Object, lease: float) -> bool:
    """By the server's clock only: its Date now, minus when the lock was last written."""
    if current.server_date is None:
        return False  # no server clock to judge by: never take over
    return (current.server_date - current.last_modified).total_seconds() > lease


def _http_date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def _record(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _sequence(record: dict[str, Any]) -> int:
    seq = record.get("seq")
    return seq if isinstance(seq, int) and seq >= 0 else 0


def _lease_of(record: dict[str, Any], default: float) -> float:
    """The holder's own lease: it renews by it."""
    lease = record.get("lease")
    return float(lease) if isinstance(lease, int | float) and lease > 0 else default


def _tombstone() -> bytes:
    return TOMBSTONE_MAGIC + secrets.token_hex(16).encode()


def _is_tombstone(data: bytes) -> bool:
    return len(data) == TOMBSTONE_SIZE and data.startswith(TOMBSTONE_MAGIC)
