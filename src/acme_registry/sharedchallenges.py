"""The responder's second look for a challenge token: the shared store.

The CA's request may reach a replica that is not the orderer. Its responder first answers
from its own DATA_DIR (the orderer's tokens are there on the orderer only), then, through
:class:`SharedChallenges.lookup`, from the shared store, but only while an "order in flight"
marker exists (that check is cached for :data:`MARKER_CACHE` seconds) and only for a token
not missed in the last :data:`MISS_CACHE` seconds: an unknown token on a public port costs
no store request while no order is in flight, and at most one a second otherwise.

When the store cannot be reached and ``stateless`` is on (``STATE_STATELESS_CHALLENGES``),
a well-formed token asked for one of our names is answered ``token + "." + thumbprint`` of
the shared account key (RFC 8555 8.1), which is what the orderer's answer would be. That
also validates orders placed by anyone holding the account key, hence off by default.

:meth:`lookup` blocks on the store: the responder runs it in a thread, never on its loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

from . import statekeys
from .httphead import canonical_host, strip_port
from .names import is_acme_token
from .storage import Storage

log = logging.getLogger(__name__)

MARKER_CACHE = 1.0
MISS_CACHE = 1.0
DOWN_CACHE = 1.0  # after a failed store request, answer without trying again for this long
MAX_MISSES = 4096


def jwk_thumbprint_ec_p256(x: bytes, y: bytes) -> str:
    """RFC 7638 thumbprint of an EC P-256 public key given by its coordinates."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    members = {"crv": "P-256", "kty": "EC", "x": b64(x), "y": b64(y)}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64(hashlib.sha256(canonical).digest())


def account_thumbprint(pem: bytes) -> str:
    """The thumbprint of the account key in ``pem`` (EC P-256, as :mod:`account` makes)."""
    # cryptography only here, and only with STATE_STATELESS_CHALLENGES=true.
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("the ACME account key is not EC P-256")
    numbers = key.public_key().public_numbers()
    return jwk_thumbprint_ec_p256(numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big"))


class SharedChallenges:
    def __init__(
        self,
        storage: Storage,
        domains: Sequence[str],
        *,
        stateless: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.domains = frozenset(canonical_host(d) for d in domains)
        self.stateless = stateless
        # Set by the agent while the store can be read; kept for when it cannot.
        self.thumbprint: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._marker_until = float("-inf")  # the marker check's answer holds until then
        self._marker_present = False
        self._down_until = float("-inf")
        self._misses: dict[str, float] = {}
        self.store_requests = 0  # for tests and the benchmark: what lookups cost the store

    def lookup(self, token: str, host: str | None) -> str | None:
        """The key authorization for ``token`` from the shared store, else None."""
        if not is_acme_token(token):
            return None
        now = self._clock()
        with self._lock:
            if now < self._down_until:
                return self._stateless_answer(token, host)
            missed = self._misses.get(token)
            if missed is not None and now < missed:
                return None
        try:
            if not self._in_flight(now):
                return None
            with self._lock:
                self.store_requests += 1
            data = self.storage.load_bytes(statekeys.challenge(token))
        except OSError as error:
            with self._lock:
                self._down_until = self._clock() + DOWN_CACHE
            log.warning("HTTP-01: the state store cannot be reached (%s)", error)
            return self._stateless_answer(token, host)
        if data is None:
            with self._lock:
                if len(self._misses) >= MAX_MISSES:
                    self._misses = {t: u for t, u in self._misses.items() if u > now}
                    if len(self._misses) >= MAX_MISSES:
                        self._misses.clear()
                self._misses[token] = now + MISS_CACHE
            return None
        return data.decode(errors="replace")

    def _in_flight(self, now: float) -> bool:
        with self._lock:
            if now < self._marker_until:
                return self._marker_present
        with self._lock:
            self.store_requests += 1
        marker = self.storage.load_json(statekeys.ORDER_IN_FLIGHT)
        expires = marker.get("expires") if marker else None
        present = isinstance(expires, int | float) and expires > time.time()
        with self._lock:
            self._marker_present = present
            self._marker_until = now + MARKER_CACHE
        return present

    def _stateless_answer(self, token: str, host: str | None) -> str | None:
        if not self.stateless or self.thumbprint is None or host is None:
            return None
        if canonical_host(strip_port(host)) not in self.domains:
            return None
        return f"{token}.{self.thumbprint}"
