"""Pending HTTP-01 challenges: token -> key authorization, kept in storage.

The issuing child process adds tokens and the long-running responder looks them up, so
they live in :class:`~acme_registry.storage.Storage`, not in memory: the same holds when
several replicas share a storage directory behind one load balancer.
"""

from __future__ import annotations

from . import statekeys
from .names import is_acme_token
from .storage import Storage


class PendingChallenges:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def add(self, token: str, key_authorization: str) -> None:
        self.storage.store(statekeys.challenge(_checked(token)), key_authorization.encode())

    def remove(self, token: str) -> None:
        self.storage.delete(statekeys.challenge(_checked(token)))

    def lookup(self, token: str) -> str | None:
        """The key authorization for a pending token; None for anything else."""
        if not is_acme_token(token):
            return None
        data = self.storage.load_bytes(statekeys.challenge(token))
        return data.decode() if data is not None else None

    def clear(self) -> None:
        """Forget every token (after an order, or tokens a killed child left behind)."""
        for key in self.storage.list(statekeys.CHALLENGES):
            self.storage.delete(key)


def _checked(token: str) -> str:
    if not is_acme_token(token):
        raise ValueError("an ACME token is base64url")
    return token
