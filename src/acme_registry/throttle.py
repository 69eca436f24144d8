"""Login throttling for the token endpoint: pure, with an injectable clock.

Keyed so that an attacker can lock out neither a user everywhere nor everyone behind one
address:

- **(user, address) pairs.** After :attr:`Limits.free_failures` (5) failed logins for one
  pair within :attr:`Limits.window` (1 minute), the pair is locked: further attempts get
  "retry after N s" without a password check. Each failure after the lock ends locks it
  again for twice as long, from :attr:`Limits.first_delay` (30 s) up to
  :attr:`Limits.max_delay` (15 minutes). A pair is forgotten after a success, or after
  :attr:`Limits.max_delay` without a failure.
- **Addresses spraying names.** An address that failed for
  :attr:`Limits.address_names` (10) different names within :attr:`Limits.address_window`
  (10 minutes) is *capped*: from it, a pair locks at its first failure instead of its
  fifth, so it gets one guess per name per lock period. A capped address never refuses a
  name that has no recent failures from it: behind a NAT, the other users still log in.
- **Never refused**: a correct password for a user from an address with no recent failures
  for that user (no pair entry) passes :meth:`LoginThrottle.check` whatever else happens.

Memory is bounded: at most :attr:`Limits.max_entries` pairs and as many addresses, the
least recently touched evicted first (an attacker must make that many failures, each a
password check, to push a locked pair out). Counters are per process: each replica
throttles on its own.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Limits:
    free_failures: int = 5
    window: float = 60.0
    first_delay: float = 30.0
    max_delay: float = 900.0
    address_names: int = 10
    address_window: float = 600.0
    max_entries: int = 10_000


@dataclass
class _Pair:
    failures: list[float] = field(default_factory=list)  # recent failure times, oldest first
    strikes: int = 0  # failures that locked the pair
    locked_until: float = 0.0
    last: float = 0.0


@dataclass
class _Address:
    names: OrderedDict[str, float] = field(default_factory=OrderedDict)  # name -> last failure
    last: float = 0.0


class LoginThrottle:
    """Decides whether a login attempt may be checked, and learns from its outcome.

    Call :meth:`check` before the password comparison; after it, :meth:`failed` or
    :meth:`succeeded`. Not thread-safe: the token service calls it from its event loop.
    """

    def __init__(
        self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or Limits()
        self._clock = clock
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def check(self, user: str, address: str) -> float | None:
        """Seconds to wait before trying again (whole, at least 1), or None: go ahead."""
        now = self._clock()
        pair = self._pair(user, address, now, create=False)
        if pair is None or pair.locked_until <= now:
            return None
        return float(max(1, math.ceil(pair.locked_until - now)))

    def failed(self, user: str, address: str) -> None:
        """A wrong password (or an unknown user) for ``user`` from ``address``."""
        now = self._clock()
        limits = self.limits
        capped = self._note_address_failure(address, user, now)
        pair = self._pair(user, address, now, create=True)
        assert pair is not None
        pair.failures = [t for t in pair.failures if now - t < limits.window][
            -limits.free_failures :
        ]
        pair.failures.append(now)
        pair.last = now
        threshold = 1 if capped else limits.free_failures
        if pair.strikes or len(pair.failures) >= threshold:
            delay = min(limits.max_delay, limits.first_delay * 2.0**pair.strikes)
            pair.strikes += 1
            pair.locked_until = now + delay

    def succeeded(self, user: str, address: str) -> None:
        """A correct password: that pair starts over."""
        self._pairs.pop((user, address), None)

    def capped(self, address: str) -> bool:
        """Whether ``address`` failed for too many names recently."""
        now = self._clock()
        entry = self._addresses.get(address)
        if entry is None:
            return False
        self._prune_names(entry, now)
        return len(entry.names) >= self.limits.address_names

    def __len__(self) -> int:
        return len(self._pairs) + len(self._addresses)

    # -- internals -------------------------------------------------------------------------

    def _pair(self, user: str, address: str, now: float, *, create: bool) -> _Pair | None:
        key = (user, address)
        pair = self._pairs.get(key)
        if pair is not None and self._forgotten(pair, now):
            del self._pairs[key]
            pair = None
        if pair is None:
            if not create:
                return None
            pair = _Pair(last=now)
            self._pairs[key] = pair
            self._evict(self._pairs)
        else:
            self._pairs.move_to_end(key)
        return pair

    def _forgotten(self, pair: _Pair, now: float) -> bool:
        # Quiet for max_delay after the lock ended (or after the last failure, unlocked).
        quiet_since = max(pair.locked_until, pair.last)
        return now - quiet_since >= max(self.limits.max_delay, self.limits.window)

    def _note_address_failure(self, address: str, user: str, now: float) -> bool:
        entry = self._addresses.get(address)
        if entry is None:
            entry = _Address(last=now)
            self._addresses[address] = entry
            self._evict(self._addresses)
        else:
            self._addresses.move_to_end(address)
        entry.last = now
        self._prune_names(entry, now)
        entry.names[user] = now
        entry.names.move_to_end(user)
        # Only the count matters beyond the threshold: keep the set small.
        while len(entry.names) > self.limits.address_names:
            entry.names.popitem(last=False)
        return len(entry.names) >= self.limits.address_names

    def _prune_names(self, entry: _Address, now: float) -> None:
        while entry.names:
            name, when = next(iter(entry.names.items()))
            if now - when < self.limits.address_window:
                break
            del entry.names[name]

    def _evict(self, table: OrderedDict[Any, Any]) -> None:
        while len(table) > self.limits.max_entries:
            table.popitem(last=False)
