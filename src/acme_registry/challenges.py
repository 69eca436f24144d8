"""Pending HTTP-01 challenges: token -> key authorization, kept in storage.

The issuing child process adds tokens and the long-running responder looks them up, so
they live in :class:`~acme_registry.storage.Storage`, not in memory: ``local`` is the
replica's own DATA_DIR, read by its responder on every challenge request.

With a shared store (``STATE_STORE=s3``, ``shared`` given) the CA's request may reach any
replica behind the load balancer, so the orderer also writes each token to the shared store,
after an "order in flight" marker (:data:`statekeys.ORDER_IN_FLIGHT`, with an expiry) that
tells the other replicas' responders to look there (:mod:`sharedchallenges`); both are
written before the CA is told to validate, and removed after the order.
"""

from __future__ import annotations

import contextlib
import json
import time

from . import statekeys
from .names import is_acme_token
from .storage import Storage, StorageConflict, new_holder_id

# How long a marker counts when its orderer died without removing it: longer than any
# order (issuer.ORDER_TIMEOUT) takes.
MARKER_SECONDS = 240.0


class PendingChallenges:
    def __init__(self, local: Storage, shared: Storage | None = None) -> None:
        self.storage = local
        self.shared = shared
        self._marker: str | None = None  # the version of the marker we wrote

    def add(self, token: str, key_authorization: str) -> None:
        key = statekeys.challenge(_checked(token))
        self.storage.store(key, key_authorization.encode())
        if self.shared is not None:
            self._mark_in_flight()
            self.shared.store(key, key_authorization.encode())

    def remove(self, token: str) -> None:
        key = statekeys.challenge(_checked(token))
        self.storage.delete(key)
        if self.shared is not None:
            self.shared.delete(key)

    def finish(self) -> None:
        """The order is over: remove our in-flight marker (not one another orderer wrote)."""
        marker, self._marker = self._marker, None
        if self.shared is None or marker is None:
            return
        # A conflict: another orderer's marker now, theirs to remove.
        with contextlib.suppress(StorageConflict):
            self.shared.delete(statekeys.ORDER_IN_FLIGHT, if_version=marker)

    def lookup(self, token: str) -> str | None:
        """The key authorization for a token pending here; None for anything else."""
        if not is_acme_token(token):
            return None
        data = self.storage.load_bytes(statekeys.challenge(token))
        return data.decode() if data is not None else None

    def clear(self) -> None:
        """Forget every local token (after an order, or tokens a killed child left behind).

        The shared store's tokens are not touched: they may be another replica's order.
        """
        for key in self.storage.list(statekeys.CHALLENGES):
            self.storage.delete(key)

    def _mark_in_flight(self) -> None:
        assert self.shared is not None
        if self._marker is not None:
            return
        marker = {"holder": new_holder_id(), "expires": time.time() + MARKER_SECONDS}
        self._marker = self.shared.store(
            statekeys.ORDER_IN_FLIGHT, json.dumps(marker).encode() + b"\n"
        )


def _checked(token: str) -> str:
    if not is_acme_token(token):
        raise ValueError("an ACME token is base64url")
    return token
