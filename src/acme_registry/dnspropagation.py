"""Is a TXT value visible yet? Checked before the CA is asked to validate.

A validation the CA runs against a record that has not reached every authoritative server
fails, and failed authorizations are rate-limited (Let's Encrypt: 5 per name per hour), so
the agent first waits until the record can be seen:

- ``authoritative``: find the zone (SOA), its NS hosts and their addresses, and ask each
  address directly (no recursion) on port 53: every one must hold the value, since the CA
  may ask any of them;
- ``resolvers``: ask only the servers in ``DNS_RESOLVERS`` (recursion on), for networks that
  block outbound port 53 or have a split horizon;
- ``off``: do not wait.

When ``DNS_RESOLVERS`` is set, every recursive lookup (SOA, NS, A/AAAA, TXT) goes to those
servers; otherwise to the system's resolver (/etc/resolv.conf).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from .dnsconfig import AUTHORITATIVE, DNS_PORT, OFF, RESOLVERS, HostPort, PropagationSettings
from .dnslookup import (
    DEFAULT_QUERY_TIMEOUT,
    DnsError,
    DnsLookup,
    Observation,
    TxtAnswer,
    absolute_name,
    answer_ttl,
    reason,
    txt_value,
)

DEFAULT_POLL_INTERVAL = 2.0


@dataclass(frozen=True)
class Visibility:
    """The outcome of one round of queries for a set of records."""

    # fqdn -> server label -> the wanted values that server does not show (or why not).
    missing: Mapping[str, Mapping[str, str]]

    @property
    def visible(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        """One line: which server lacks what, for the log, ``status`` and errors."""
        parts = []
        for fqdn, servers in sorted(self.missing.items()):
            gaps = ", ".join(f"{server} {gap}" for server, gap in sorted(servers.items()))
            parts.append(f"{fqdn}: {gaps}")
        return "; ".join(parts) or "every record is visible"


def compare(
    wanted: Mapping[str, Collection[str]], observed: Mapping[str, Mapping[str, Observation]]
) -> Visibility:
    """Pure: which servers do not yet show every wanted value of every record."""
    missing: dict[str, dict[str, str]] = {}
    for fqdn, values in wanted.items():
        servers = observed.get(fqdn, {})
        if not servers:
            missing[fqdn] = {"no server": "was asked"}
            continue
        for server, seen in servers.items():
            if isinstance(seen, str):
                missing.setdefault(fqdn, {})[server] = f"({seen})"
                continue
            absent = sorted(set(values) - seen)
            if absent:
                shown = ", ".join(repr(v) for v in absent)
                missing.setdefault(fqdn, {})[server] = f"lacks {shown}"
    return Visibility(missing)


def query_txt(
    address: str, port: int, fqdn: str, *, recursion: bool, timeout: float
) -> Observation:
    """Ask one server directly for the TXT values at ``fqdn`` (TCP when UDP is truncated)."""
    return query_txt_answer(address, port, fqdn, recursion=recursion, timeout=timeout).observation


def query_txt_answer(
    address: str, port: int, fqdn: str, *, recursion: bool, timeout: float
) -> TxtAnswer:
    """:func:`query_txt` with the answer's TTL (negative TTL for "no such record")."""
    query = dns.message.make_query(absolute_name(fqdn), dns.rdatatype.TXT)
    if not recursion:
        query.flags &= ~dns.flags.RD
    try:
        response, _ = dns.query.udp_with_fallback(query, address, timeout=timeout, port=port)
    except (OSError, dns.exception.DNSException) as error:
        return TxtAnswer(reason(error))
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return TxtAnswer(dns.rcode.to_text(rcode))
    if not recursion and not response.flags & dns.flags.AA:
        # A server that is listed as NS but does not serve the zone: it cannot have it.
        return TxtAnswer("not authoritative")
    qname = query.question[0].name
    values: set[str] = set()
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT and rrset.name == qname:
            values.update(txt_value(rdata) for rdata in rrset)
    return TxtAnswer(frozenset(values), answer_ttl(response, qname))


class PropagationChecker:
    """Polls until TXT values are visible where the settings say to look.

    ``authoritative_port`` is the port the authoritative servers are asked on: 53, always,
    in production (the CA asks there too); tests override it to reach servers on another
    loopback port.
    """

    def __init__(
        self,
        settings: PropagationSettings,
        *,
        authoritative_port: int = DNS_PORT,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.settings = settings
        self.authoritative_port = authoritative_port
        self.query_timeout = query_timeout
        self.poll_interval = poll_interval
        self.lookup = DnsLookup(settings.resolvers, timeout=query_timeout)

    def observe(self, fqdn: str) -> dict[str, Observation]:
        """What each server to be checked shows at ``fqdn`` now (server label -> values).

        With ``off``, the one recursive lookup (for callers that need the current values,
        such as the dns-persist-01 precondition check). Raises :class:`DnsError` only when
        the servers to ask cannot be found (no zone, no NS, no address).
        """
        return {label: answer.observation for label, answer in self.answers(fqdn).items()}

    def answers(self, fqdn: str) -> dict[str, TxtAnswer]:
        """:meth:`observe` with each answer's TTL."""
        if self.settings.check == RESOLVERS:
            return {
                str(server): query_txt_answer(
                    server.host, server.port, fqdn, recursion=True, timeout=self.query_timeout
                )
                for server in self.settings.resolvers
            }
        if self.settings.check == AUTHORITATIVE:
            return {
                f"{host} {_host_port(address, self.authoritative_port)}": query_txt_answer(
                    address,
                    self.authoritative_port,
                    fqdn,
                    recursion=False,
                    timeout=self.query_timeout,
                )
                for host, address in self.authoritative_servers(fqdn)
            }
        return {"resolver": self.lookup.txt_answer(fqdn)}

    def authoritative_servers(self, fqdn: str) -> list[tuple[str, str]]:
        """(NS host, address) of every authoritative server of the zone holding ``fqdn``."""
        zone = self.lookup.zone_of(fqdn)
        servers = [
            (host, address)
            for host in self.lookup.nameservers(zone)
            for address in self.lookup.addresses(host)
        ]
        if not servers:
            raise DnsError(f"zone {zone} has no name servers")
        return servers

    def check(self, wanted: Mapping[str, Collection[str]]) -> Visibility:
        """One round of queries for every record in ``wanted`` (fqdn -> values)."""
        observed: dict[str, Mapping[str, Observation]] = {}
        for fqdn in wanted:
            try:
                observed[fqdn] = self.observe(fqdn)
            except DnsError as error:
                observed[fqdn] = {"lookup": str(error)}
        return compare(wanted, observed)

    def wait_visible(
        self, wanted: Mapping[str, Collection[str]], *, timeout: float | None = None
    ) -> Visibility:
        """Poll until every value of every record is visible; :class:`DnsError` on timeout.

        Returns at once with ``off``. The error names what was still missing where.
        """
        if self.settings.check == OFF:
            return Visibility({})
        limit = self.settings.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            visibility = self.check(wanted)
            if visibility.visible:
                return visibility
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DnsError(
                    f"TXT records not visible after {limit:g} s "
                    f"(DNS_PROPAGATION_CHECK={self.settings.check}): {visibility.describe()}"
                )
            time.sleep(min(self.poll_interval, remaining))


def _host_port(address: str, port: int) -> str:
    return str(HostPort(address, port))
