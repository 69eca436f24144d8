"""Keeps a held :class:`~.storage.Lock` alive while work runs under it.

A thread renews the lease every third of it. The lock counts as lost (``lock.lost`` set)
when the store says another holder has it, or when no renewal succeeded for a whole lease
(the store was unreachable: by then another replica may judge the lock stale and take it).
Work under the lock checks ``lost`` and stops; what it commits is conditional anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from .storage import Lock, LockLost

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, lock: Lock, every: float | None = None) -> None:
        self.lock = lock
        self.every = every if every is not None else max(0.2, lock.lease / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease:{lock.name}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.every):
            try:
                self.lock.renew()
                renewed = time.monotonic()
            except LockLost as error:
                log.error("%s; stopping the work done under it", error)
                self.lock.lost.set()
                return
            except OSError as error:
                if time.monotonic() - renewed >= self.lock.lease:
                    log.error(
                        "lock %r not renewed for a whole lease (%s); counting it as lost",
                        self.lock.name,
                        error,
                    )
                    self.lock.lost.set()
                    return
                log.warning("lock %r: renewal failed (%s); trying again", self.lock.name, error)
