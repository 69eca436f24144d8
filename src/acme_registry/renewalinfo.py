"""Tracking the CA's renewal information (ARI) for the served certificate.

:mod:`ari` holds the protocol (IDs, parsing, one GET); this module holds the state around
it: which window the CA suggested, the instant chosen in it, and when to ask again, kept
in storage (``state/ari.json``) so a restart neither asks early nor picks a new instant.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from . import ari, schedule, statekeys
from .certstore import CertificatePair
from .storage import Storage

log = logging.getLogger(__name__)

DIRECTORY_MAX_AGE = 3600.0  # seconds: the directory's renewalInfo URL rarely changes


class RenewalInfoTracker:
    """When to renew a pair: inside the CA's ARI window when it offers one, else by lifetime."""

    def __init__(
        self,
        storage: Storage,
        directory_url: str,
        ca_bundle: str | None,
        max_recheck: dt.timedelta,
    ) -> None:
        self.storage = storage
        self.directory_url = directory_url
        self.max_recheck = max_recheck
        self._tls_to_ca = ari.ssl_context(ca_bundle)
        self._directory: dict[str, object] | None = None
        self._directory_at = 0.0

    def plan(
        self, pair: CertificatePair, now: dt.datetime
    ) -> tuple[schedule.RenewalPlan, dt.datetime | None]:
        """The renewal plan, and when to fetch the ARI window again (None without ARI)."""
        renewal_info_url = self._renewal_info_url()
        fallback = schedule.lifetime_renewal(pair.not_before, pair.not_after)
        if renewal_info_url is None:
            return fallback, None
        cert_id = ari.cert_id(pair.leaf)
        state = self.storage.load_json(statekeys.ARI) or {}
        if state.get("cert_id") != cert_id:
            state = {"cert_id": cert_id}
        next_fetch = state.get("next_fetch")
        if next_fetch is None or now >= dt.datetime.fromisoformat(next_fetch):
            state = self._fetch(renewal_info_url, pair, state, now)
            self.storage.store_json(statekeys.ARI, state)
        recheck = dt.datetime.fromisoformat(state["next_fetch"])
        if "chosen" not in state:
            return fallback, recheck
        reason = f"inside the CA's ARI window {state['start']} - {state['end']}"
        return schedule.RenewalPlan(dt.datetime.fromisoformat(state["chosen"]), reason), recheck

    def replaces(self, pair: CertificatePair, domains: tuple[str, ...]) -> str | None:
        """The ARI ID of the certificate a renewal replaces (same names, ARI offered)."""
        if pair.names != frozenset(domains) or self._renewal_info_url() is None:
            return None
        try:
            return ari.cert_id(pair.leaf)
        except ValueError:
            return None

    def _fetch(
        self, url: str, pair: CertificatePair, state: dict[str, Any], now: dt.datetime
    ) -> dict[str, Any]:
        try:
            info = ari.fetch(url, pair.leaf, self._tls_to_ca, now)
        except (OSError, ValueError) as error:
            log.warning("renewal information unavailable (%s); asking again later", error)
            delay = min(ari.ERROR_RECHECK, self.max_recheck)
            return {**state, "next_fetch": (now + delay).isoformat()}
        window = (info.start.isoformat(), info.end.isoformat())
        if (state.get("start"), state.get("end")) != window:
            chosen = ari.choose_instant(info, expires=pair.not_after)
            log.info(
                "the CA suggests renewing between %s and %s; chose %s%s",
                *window,
                chosen.isoformat(),
                f" (why: {info.explanation_url})" if info.explanation_url else "",
            )
            state = {**state, "start": window[0], "end": window[1], "chosen": chosen.isoformat()}
        if info.explanation_url:
            state["explanation_url"] = info.explanation_url
        delay = min(info.recheck_after, self.max_recheck)
        return {**state, "next_fetch": (now + delay).isoformat()}

    def _renewal_info_url(self) -> str | None:
        """The directory's renewalInfo URL; the directory is fetched at most once an hour."""
        now = time.monotonic()
        if self._directory is None or now - self._directory_at > DIRECTORY_MAX_AGE:
            try:
                self._directory = ari.directory(self.directory_url, self._tls_to_ca)
                self._directory_at = now
            except (OSError, ValueError) as error:
                log.warning("the ACME directory is unreachable: %s", error)
                return None
        url = self._directory.get("renewalInfo")
        return url if isinstance(url, str) else None
