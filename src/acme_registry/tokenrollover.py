"""When the token-signing keyring rolls over: its lifetimes and the two decisions. Pure.

A signing certificate lives :attr:`KeyringTimes.lifetime`; :attr:`KeyringTimes.lead`
before it expires the next key is made and published in the root bundle; the next key
starts signing (:func:`switch_due`) once the registry that checks its tokens trusts it.

With one instance that is known exactly: the agent started a registry generation with the
bundle (``served_here``). With several replicas on a shared store (``STATE_STORE=s3``) it is
not: each replica follows the shared keyring and starts a generation with the new bundle
when it sees it, within its poll interval (at most a minute). So a replica switches only
once the next key has been in the store for :attr:`KeyringTimes.grace` (7 days by default,
10,000 times the longest poll interval), and only once its own registry trusts it. Tokens
it signs are then checked by replicas that have all started a generation with the new
bundle long ago; tokens the old key signed stay valid because the old certificate stays in
the bundle until it expires, :attr:`~KeyringTimes.lead` minus the grace (23 days) later.

This module does not import ``cryptography``: config reads :class:`KeyringTimes` in every
mode.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

CERT_LIFETIME = dt.timedelta(days=365)
NEXT_KEY_LEAD = dt.timedelta(days=30)
SHARED_SWITCH_GRACE = dt.timedelta(days=7)
NO_GRACE = dt.timedelta(0)


@dataclass(frozen=True)
class KeyringTimes:
    """The keyring's lifetimes (tests shorten them: :func:`parse_keyring_times`)."""

    lifetime: dt.timedelta = CERT_LIFETIME  # a signing certificate's validity
    lead: dt.timedelta = NEXT_KEY_LEAD  # the next key is made this long before expiry
    grace: dt.timedelta = SHARED_SWITCH_GRACE  # shared store: the next key's wait in it

    def __post_init__(self) -> None:
        if not dt.timedelta(0) < self.lead < self.lifetime:
            raise ValueError("the lead must be positive and shorter than the lifetime")
        if not dt.timedelta(0) <= self.grace < self.lead:
            raise ValueError("the grace must be shorter than the lead")

    def single(self) -> KeyringTimes:
        """One instance: its own registry is the only one to wait for, so no grace."""
        return KeyringTimes(self.lifetime, self.lead, NO_GRACE)


def parse_keyring_times(text: str) -> KeyringTimes:
    """``LIFETIME,LEAD,GRACE`` in seconds; ValueError (one line) otherwise."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError("expected LIFETIME,LEAD,GRACE in seconds")
    try:
        lifetime, lead, grace = (dt.timedelta(seconds=float(p)) for p in parts)
    except ValueError:
        raise ValueError("expected LIFETIME,LEAD,GRACE in seconds") from None
    return KeyringTimes(lifetime, lead, grace)


def next_key_due(now: dt.datetime, current_not_after: dt.datetime, times: KeyringTimes) -> bool:
    """Whether the next key must be made (and published) now."""
    return now >= current_not_after - times.lead


def switch_due(
    now: dt.datetime, *, next_since: dt.datetime, served_here: bool, grace: dt.timedelta
) -> bool:
    """Whether the next key, published at ``next_since``, may sign from ``now`` on.

    ``served_here``: this agent's registry runs with a bundle that holds it. ``grace``: how
    long every other replica has had to do the same (zero with one instance).
    """
    return served_here and now >= next_since + grace
