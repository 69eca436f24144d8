"""One small record that says "a followed record changed": the replicas' idle poll.

With a shared store (``STATE_STORE=s3``) every replica follows records that others write:
the certificate (:mod:`sharedcert`) and the users (:mod:`auth`). Reading each of them every
``STATE_POLL_INTERVAL`` would cost one request per record per replica while nothing
changes. Instead every writer of a followed record overwrites :data:`statekeys.CHANGES`
once its write succeeded (:func:`bump`: a new random body, so a new ETag), and each replica
reads only that record every interval (:class:`ChangeWatch`: a conditional GET, 304 while
nothing changed). The followed records are read again when it changed.

Why that order is enough: a writer bumps after its write, and the store reads after a
write consistently, so a replica that sees the new change record reads the new record (or
a newer one). What it cannot cover, a writer that wrote its record but not the bump (it
crashed, or the store failed between the two requests, or a replica of an older version
wrote), is caught by a full look every :data:`FULL_LOOK` seconds: the watch then reports a
change anyway, and each follower re-reads its record (conditional GETs, cheap).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

from . import statekeys
from .storage import Storage

log = logging.getLogger(__name__)

# Followers re-read their records this often even when the change record stayed put.
FULL_LOOK = 60.0


def _marker() -> bytes:
    return secrets.token_hex(16).encode() + b"\n"


def bump(storage: Storage) -> None:
    """Tell the other replicas that a followed record changed; call it after the write.

    A failure is logged, not raised: the record itself is written, and the replicas find
    it at their next full look (:data:`FULL_LOOK`).
    """
    try:
        storage.store(statekeys.CHANGES, _marker())
    except OSError as error:
        log.warning(
            "could not mark the shared state changed (%s): the other replicas see the change "
            "within %d s",
            error,
            FULL_LOOK,
        )


class ChangeWatch:
    """One replica's view of :data:`statekeys.CHANGES`, shared by the threads that follow.

    :meth:`look` is the one request per poll; :attr:`serial` counts the changes seen (a
    full look counts as one). Each follower keeps the serial it last acted on and reads its
    record again when the watch's serial differs. :attr:`error` is why the last look
    failed (None once one succeeds): the store is down.
    """

    def __init__(
        self,
        storage: Storage,
        full_look: float = FULL_LOOK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.serial = 0
        self.error: str | None = None
        self._full_look = full_look
        self._clock = clock
        self._version: str | None = None
        self._seen = False
        self._next_full = clock() + full_look
        self._guard = threading.Lock()

    def look(self) -> int:
        """Read the change record (conditionally once seen); the serial after it. OSError
        when the store cannot be reached."""
        with self._guard:
            try:
                changed = self._read()
            except OSError as error:
                self.error = str(error) or type(error).__name__
                raise
            self.error = None
            now = self._clock()
            if now >= self._next_full:
                changed = True
                self._next_full = now + self._full_look
            if changed:
                self.serial += 1
            return self.serial

    def _read(self) -> bool:
        if self._seen:
            changed, found = self.storage.load_if_changed(statekeys.CHANGES, self._version)
        else:
            changed, found = True, self.storage.load(statekeys.CHANGES)
        if not changed:
            return False
        if found is None:
            # None yet (a new bucket, or no writer since the feature came): make one, so
            # later looks are 304s rather than 404s that a conditional GET cannot answer.
            self._version = self.storage.store(statekeys.CHANGES, _marker())
        else:
            self._version = found.version
        self._seen = True
        return True
