"""The DNS side of one order: which records its authorizations need, put in and taken out.

This is the seam the issuer calls for ``ACME_CHALLENGE=dns-01`` and ``dns-persist-01``,
between the ``acme`` library's objects and the DNS modules:

- :func:`dns01_records` picks each pending authorization's dns-01 challenge and computes the
  TXT record it needs (a name and its wildcard give two values at one record name);
- :func:`present_all` adds them all (and on a failure removes what it had added), then the
  issuer waits with :meth:`PropagationChecker.wait_visible` on :func:`wanted` before it
  answers any challenge;
- :func:`cleanup_all` removes exactly those values, best effort, after the order whatever
  its outcome (and for records a crashed order left, from the issuer's saved state:
  :meth:`Dns01Record.to_state` / :func:`record_from_state`);
- :func:`persist_challenges` finds the dns-persist-01 challenge of each pending
  authorization, which ``acme`` parses as an ``UnrecognizedChallenge``; it is answered with
  :class:`DnsPersist01Response` (here, not in the pure :mod:`dnspersist`, which the
  long-running agent imports without the ACME stack).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import josepy as jose
from acme import challenges, messages

from . import dnspersist
from .dnsproviders import DnsError, DnsProvider


@dataclass(frozen=True)
class Dns01Record:
    """One TXT value a dns-01 challenge needs, and the challenge it answers."""

    identifier: str  # as in the order: example.com or *.example.com
    fqdn: str  # _acme-challenge.example.com (no trailing dot)
    value: str
    challenge: messages.ChallengeBody | None = None

    def to_state(self) -> dict[str, str]:
        """What the issuer saves before presenting, so a crashed order can be cleaned up."""
        return {"identifier": self.identifier, "fqdn": self.fqdn, "value": self.value}


def record_from_state(state: Mapping[str, str]) -> Dns01Record:
    return Dns01Record(state["identifier"], state["fqdn"], state["value"])


def dns01_records(
    authorizations: Iterable[messages.AuthorizationResource], account_key: jose.JWK
) -> list[Dns01Record]:
    """The records of every pending authorization; DnsError if one offers no dns-01."""
    records = []
    for authz in authorizations:
        body = authz.body
        if body.status != messages.STATUS_PENDING:
            continue  # already valid (reused authorization): nothing to prove
        name = body.identifier.value
        identifier = f"*.{name}" if body.wildcard else name
        challb = next((c for c in body.challenges if isinstance(c.chall, challenges.DNS01)), None)
        if challb is None:
            offered = ", ".join(_challenge_type(c) for c in body.challenges)
            raise DnsError(f"the CA offers no dns-01 challenge for {identifier} (only {offered})")
        chall = challb.chall
        assert isinstance(chall, challenges.DNS01)
        records.append(
            Dns01Record(
                identifier=identifier,
                # The base name for a wildcard too: both share _acme-challenge.<name>.
                fqdn=chall.validation_domain_name(name),
                value=chall.validation(account_key),
                challenge=challb,
            )
        )
    return records


def wanted(records: Iterable[Dns01Record]) -> dict[str, set[str]]:
    """fqdn -> values, as :meth:`PropagationChecker.wait_visible` takes them."""
    result: dict[str, set[str]] = {}
    for record in records:
        result.setdefault(record.fqdn, set()).add(record.value)
    return result


def present_all(provider: DnsProvider, records: Sequence[Dns01Record]) -> None:
    """Add every record; if one fails, remove those already added and raise its DnsError."""
    done: list[Dns01Record] = []
    for record in records:
        try:
            provider.present(record.fqdn, record.value)
        except DnsError:
            cleanup_all(provider, done)
            raise
        done.append(record)


def cleanup_all(provider: DnsProvider, records: Iterable[Dns01Record]) -> list[DnsError]:
    """Remove every record, going on past failures; the failures are returned for the log."""
    failures = []
    for record in records:
        try:
            provider.cleanup(record.fqdn, record.value)
        except DnsError as error:
            failures.append(error)
    return failures


def answer(record: Dns01Record, account_key: jose.JWK) -> challenges.ChallengeResponse:
    """The response to post for ``record``'s challenge (``ClientV2.answer_challenge``)."""
    if record.challenge is None or not isinstance(record.challenge.chall, challenges.DNS01):
        raise ValueError(f"{record.identifier}: no dns-01 challenge attached")
    return record.challenge.chall.response(account_key)


@dataclass(frozen=True)
class PersistAuthorization:
    identifier: str
    challenge: messages.ChallengeBody
    parsed: dnspersist.PersistChallenge


def persist_challenges(
    authorizations: Iterable[messages.AuthorizationResource], issuer: str
) -> list[PersistAuthorization]:
    """The dns-persist-01 challenge of every pending authorization.

    DnsError when one has none, or when the CA's ``issuer-domain-names`` do not include the
    issuer the record names (the record would not count: say so rather than fail validation).
    """
    found = []
    for authz in authorizations:
        body = authz.body
        if body.status != messages.STATUS_PENDING:
            continue
        name = body.identifier.value
        identifier = f"*.{name}" if body.wildcard else name
        for challb in body.challenges:
            chall = challb.chall
            if isinstance(chall, challenges.UnrecognizedChallenge) and (
                chall.jobj.get("type") == dnspersist.CHALLENGE_TYPE
            ):
                try:
                    parsed = dnspersist.parse_challenge(chall.jobj)
                except ValueError as error:
                    raise DnsError(f"{identifier}: {error}") from None
                if issuer not in parsed.issuer_domain_names:
                    names = ", ".join(parsed.issuer_domain_names)
                    raise DnsError(
                        f"{identifier}: the CA accepts records for {names}, not {issuer} "
                        "(ACME_DNS_PERSIST_ISSUER)"
                    )
                found.append(PersistAuthorization(identifier, challb, parsed))
                break
        else:
            offered = ", ".join(_challenge_type(c) for c in body.challenges)
            raise DnsError(
                f"the CA offers no dns-persist-01 challenge for {identifier} (only {offered})"
            )
    return found


def _challenge_type(challb: messages.ChallengeBody) -> str:
    chall = challb.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type", "?"))
    return str(getattr(chall, "typ", "?"))


@challenges.ChallengeResponse.register
class DnsPersist01Response(challenges.ChallengeResponse):
    """The answer to a dns-persist-01 challenge: ``{}``, as for every RFC 8555 challenge.

    ``acme`` has no such type; with this, ``ClientV2.answer_challenge(challb,
    DnsPersist01Response())`` works on the ``UnrecognizedChallenge`` body it parsed.
    """

    typ = dnspersist.CHALLENGE_TYPE

    def __bool__(self) -> bool:
        # acme sends ``b""`` (a POST-as-GET, which the CA answers without validating) for a
        # falsy body, and a josepy object with no fields has length 0: it must stay "{}".
        return True
