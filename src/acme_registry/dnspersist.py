"""dns-persist-01 (draft-ietf-acme-dns-persist): the one TXT record an operator sets once.

Pure. The record lives at ``_validation-persist.<name>.`` and says which CA (by its issuer
domain name) may issue for ``<name>`` to which ACME account:

    <issuer-domain-name>; accounturi=<account URL>[; policy=wildcard][; persistUntil=<unix>]

``policy=wildcard`` also covers ``*.<name>`` (and names below it), so a name and its
wildcard need one record. This module builds those records, renders them for
``acme-registry dns-persist-record`` (``--json`` and zone-file lines), checks the values
found in DNS against what the account needs (a typed verdict carrying the exact value to
create), chooses the issuer domain name, and reads a CA's dns-persist-01 challenge object,
which the ``acme`` library does not parse.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

CHALLENGE_TYPE = "dns-persist-01"
LABEL = "_validation-persist"
WILDCARD_POLICY = "wildcard"
# While the record is missing or wrong, it is looked up again this often (or after its TTL,
# if longer): the certificate follows within one interval of the operator creating it.
RECHECK_SECONDS = 30
TXT_STRING_MAX = 255

_ISSUER = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


@dataclass(frozen=True)
class PersistRecord:
    """One record to create: at ``name`` (absolute), TXT ``value``."""

    name: str
    value: str
    type: str = "TXT"

    def zone_file_line(self) -> str:
        """The record as a zone-file line (the zone's default TTL applies)."""
        return f"{self.name} IN TXT {quote_txt(self.value)}"


@dataclass(frozen=True)
class PersistValue:
    """A parsed TXT value of a ``_validation-persist`` record."""

    issuer: str
    account_uri: str | None
    policy: str | None = None
    persist_until: dt.datetime | None = None
    # A value whose parameters could not be read: why (the CA would ignore it too).
    problem: str | None = None

    @property
    def allows_wildcard(self) -> bool:
        return (self.policy or "").lower() == WILDCARD_POLICY


class PersistStatus(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    OTHER_ACCOUNT = "other_account"
    EXPIRED = "expired"
    NO_WILDCARD_POLICY = "no_wildcard_policy"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class PersistVerdict:
    """Whether the record for one name lets this account be issued for, and what to do."""

    status: PersistStatus
    record: PersistRecord
    # The value found that decided the verdict (None when nothing for this issuer exists).
    found: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is PersistStatus.OK

    def message(self) -> str:
        """One line for the log, ``status`` and /readyz: what is wrong and the exact fix."""
        want = f"create TXT {self.record.name} {quote_txt(self.record.value)}"
        found = f" (found {quote_txt(self.found)})" if self.found is not None else ""
        reasons = {
            PersistStatus.OK: f"{self.record.name} authorizes this account",
            PersistStatus.MISSING: f"no dns-persist-01 record at {self.record.name}: {want}",
            PersistStatus.OTHER_ACCOUNT: (
                f"{self.record.name} names another ACME account{found}: {want}"
            ),
            PersistStatus.EXPIRED: f"{self.record.name} has expired (persistUntil){found}: {want}",
            PersistStatus.NO_WILDCARD_POLICY: (
                f"{self.record.name} lacks policy=wildcard, needed for the wildcard{found}: {want}"
            ),
            PersistStatus.MALFORMED: f"{self.record.name} cannot be parsed{found}: {want}",
        }
        return reasons[self.status]


@dataclass(frozen=True)
class PersistChallenge:
    """What the issuer needs from a dns-persist-01 challenge object."""

    url: str
    status: str
    issuer_domain_names: tuple[str, ...]
    # Pebble 2.10 sends neither; kept when a CA does, to compare with our account URL.
    token: str | None = None
    account_uri: str | None = None


# -- names and values ----------------------------------------------------------------------


def base_name(identifier: str) -> str:
    """The name whose record covers ``identifier`` (``*.example.com`` -> ``example.com``)."""
    name = identifier.lower().rstrip(".")
    return name[2:] if name.startswith("*.") else name


def record_name(identifier: str) -> str:
    """``_validation-persist.<name>.`` for a name or its wildcard."""
    return f"{LABEL}.{base_name(identifier)}."


def record_value(issuer: str, account_uri: str, *, wildcard: bool = False) -> str:
    value = f"{issuer}; accounturi={account_uri}"
    return f"{value}; policy={WILDCARD_POLICY}" if wildcard else value


def records_for(identifiers: Iterable[str], issuer: str, account_uri: str) -> list[PersistRecord]:
    """One record per base name, in the order first named, with policy=wildcard if needed."""
    wildcard: dict[str, bool] = {}
    for identifier in identifiers:
        base = base_name(identifier)
        wildcard[base] = wildcard.get(base, False) or identifier.startswith("*.")
    return [
        PersistRecord(record_name(base), record_value(issuer, account_uri, wildcard=wild))
        for base, wild in wildcard.items()
    ]


def render_json(records: Sequence[PersistRecord]) -> str:
    """``{"records": [{"name": ..., "type": "TXT", "value": ...}]}``, the value unquoted."""
    return json.dumps(
        {"records": [{"name": r.name, "type": r.type, "value": r.value} for r in records]}
    )


def render_zone_lines(records: Sequence[PersistRecord]) -> str:
    return "".join(record.zone_file_line() + "\n" for record in records)


def quote_txt(value: str) -> str:
    """``value`` as zone-file TXT data: quoted, escaped, split into 255-byte strings."""
    data = value.encode()
    chunks = [data[i : i + TXT_STRING_MAX] for i in range(0, len(data), TXT_STRING_MAX)] or [b""]
    quoted = []
    for chunk in chunks:
        text = chunk.decode(errors="replace").replace("\\", "\\\\").replace('"', '\\"')
        quoted.append(f'"{text}"')
    return " ".join(quoted)


def parse_value(text: str) -> PersistValue:
    """Read ``issuer; key=value; ...`` (whitespace around ``;`` and ``=`` allowed).

    Parameter names are matched case-insensitively; unknown ones are ignored, as the draft
    asks. An issuer alone, without parameters, is kept with ``account_uri`` None.
    """
    issuer, *params = (part.strip() for part in text.split(";"))
    fields: dict[str, str] = {}
    problem: str | None = None
    for param in params:
        if not param:
            continue
        key, eq, value = param.partition("=")
        if not eq:
            problem = f"parameter {param!r} has no '='"
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    persist_until = None
    if "persistuntil" in fields:
        raw = fields["persistuntil"]
        if raw.isdigit():
            persist_until = dt.datetime.fromtimestamp(int(raw), dt.UTC)
        else:
            problem = f"persistUntil {raw!r} is not a unix time"
    return PersistValue(
        issuer=issuer.lower().rstrip("."),
        account_uri=fields.get("accounturi"),
        policy=fields.get("policy"),
        persist_until=persist_until,
        problem=problem,
    )


def check_record(
    identifiers: Sequence[str],
    found_values: Iterable[str],
    *,
    issuers: Sequence[str],
    account_uri: str,
    now: dt.datetime,
) -> PersistVerdict:
    """The verdict for the record covering ``identifiers`` (one base name and its wildcard).

    ``found_values`` are the TXT values at the record name; ``issuers`` the CA's issuer
    domain names (the first is the one the value to create names). A value for another CA
    is not ours to judge and is skipped; of the values for this CA, one that authorizes the
    account wins, else the most telling problem is reported.
    """
    if not issuers:
        raise ValueError("check_record needs at least one issuer domain name")
    bases = {base_name(i) for i in identifiers}
    if len(bases) != 1:
        raise ValueError(f"identifiers {identifiers!r} do not share one record")
    wildcard = any(i.startswith("*.") for i in identifiers)
    (record,) = records_for(identifiers, issuers[0], account_uri)
    wanted_issuers = {i.lower().rstrip(".") for i in issuers}
    # Most telling first: a record that names us but is wrong beats one for another account.
    ranked: list[tuple[int, PersistStatus, str]] = []
    for text in found_values:
        value = parse_value(text)
        if value.issuer not in wanted_issuers:
            continue
        if value.problem is not None or value.account_uri is None:
            ranked.append((4, PersistStatus.MALFORMED, text))
        elif value.account_uri != account_uri:
            ranked.append((5, PersistStatus.OTHER_ACCOUNT, text))
        elif value.persist_until is not None and value.persist_until <= now:
            ranked.append((1, PersistStatus.EXPIRED, text))
        elif wildcard and not value.allows_wildcard:
            ranked.append((2, PersistStatus.NO_WILDCARD_POLICY, text))
        else:
            return PersistVerdict(PersistStatus.OK, record, text)
    if not ranked:
        return PersistVerdict(PersistStatus.MISSING, record)
    _, status, text = min(ranked)
    return PersistVerdict(status, record, text)


def group_by_record(identifiers: Iterable[str]) -> dict[str, list[str]]:
    """Record name -> the identifiers it covers, in the order first named."""
    groups: dict[str, list[str]] = {}
    for identifier in identifiers:
        groups.setdefault(record_name(identifier), []).append(identifier)
    return groups


def recheck_delay(ttls: Iterable[int | None]) -> int:
    """Seconds until a failing precondition is checked again: 30, or the TTL if longer.

    ``ttls``: how long each answer of the last check may be cached (the records' TTL, or
    the negative TTL of "no such record"; None where unknown). The longest counts: until it
    has passed, some resolver, the CA's among them, may still give the old answer.
    """
    return max([RECHECK_SECONDS, *(ttl for ttl in ttls if ttl is not None)])


# -- the CA's side -------------------------------------------------------------------------


def choose_issuer(directory_meta: Mapping[str, Any] | None, configured: str | None) -> str:
    """The issuer domain name the record must name.

    From the directory's ``meta.caaIdentities`` (RFC 8555 7.1.1; Pebble 2.10 fills the
    challenge's ``issuer-domain-names`` from the same list): the configured one when it is
    among them, else the first. Without any, ``ACME_DNS_PERSIST_ISSUER`` must say it: no
    order is ever spent to learn it.
    """
    identities = []
    raw = (directory_meta or {}).get("caaIdentities") or []
    # A list from JSON; a tuple from acme's Directory.Meta (its to_partial_json()).
    if isinstance(raw, list | tuple):
        identities = [str(x).lower().rstrip(".") for x in raw if isinstance(x, str) and x]
    if configured and configured in identities:
        return configured
    if identities:
        return identities[0]
    if configured:
        return configured
    raise ConfigError(
        "ACME_DNS_PERSIST_ISSUER",
        "required: the CA's directory names no issuer domain name (meta.caaIdentities)",
    )


def parse_challenge(raw: Mapping[str, Any]) -> PersistChallenge:
    """Read a dns-persist-01 challenge object (``UnrecognizedChallenge.jobj`` in ``acme``).

    Pebble 2.10 sends ``{"type", "url", "status", "issuer-domain-names": [...]}`` with no
    token and no ``accounturi``. Raises ValueError when it is not a usable one.
    """
    if raw.get("type") != CHALLENGE_TYPE:
        raise ValueError(f"not a {CHALLENGE_TYPE} challenge: type {raw.get('type')!r}")
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise ValueError(f"{CHALLENGE_TYPE} challenge without an https url: {url!r}")
    names = raw.get("issuer-domain-names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{CHALLENGE_TYPE} challenge without issuer-domain-names")
    issuers = []
    for name in names:
        text = str(name).lower().rstrip(".") if isinstance(name, str) else ""
        if not _ISSUER.match(text):
            raise ValueError(f"{CHALLENGE_TYPE} challenge: bad issuer domain name {name!r}")
        issuers.append(text)
    token = raw.get("token")
    account = raw.get("accounturi")
    return PersistChallenge(
        url=url,
        status=str(raw.get("status", "")),
        issuer_domain_names=tuple(issuers),
        token=token if isinstance(token, str) and token else None,
        account_uri=account if isinstance(account, str) and account else None,
    )
