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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from .dnsconfig import AUTHORITATIVE, DNS_PORT, OFF, RESOLVERS, HostPort, PropagationSettings
from .dnsproviders import DnsError, absolute_name, txt_value

DEFAULT_QUERY_TIMEOUT = 3.0
DEFAULT_POLL_INTERVAL = 2.0

# What one server said about a name: its TXT values, or why there is no answer.
Observation = frozenset[str] | str


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


class DnsLookup:
    """Recursive lookups through DNS_RESOLVERS when set, else the system's resolver."""

    def __init__(
        self, resolvers: Sequence[HostPort] = (), *, timeout: float = DEFAULT_QUERY_TIMEOUT
    ) -> None:
        self.resolvers = tuple(resolvers)
        self.timeout = timeout
        self._resolver = dns.resolver.Resolver(configure=not self.resolvers)
        if self.resolvers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(server.host, server.port) for server in self.resolvers
            ]
        self._resolver.lifetime = timeout * 2
        self._resolver.timeout = timeout

    def zone_of(self, fqdn: str) -> dns.name.Name:
        """The zone holding ``fqdn``: the closest enclosing name with an SOA."""
        try:
            return dns.resolver.zone_for_name(absolute_name(fqdn), resolver=self._resolver)
        except dns.exception.DNSException as error:
            raise DnsError(f"cannot find the zone of {fqdn} ({self._via()}): {error}") from None

    def nameservers(self, zone: dns.name.Name) -> list[str]:
        """The NS host names of ``zone``, sorted."""
        answer = self._resolve(zone, dns.rdatatype.NS)
        return sorted(rdata.target.to_text() for rdata in answer)

    def addresses(self, host: str) -> list[str]:
        """The IPv4 then IPv6 addresses of ``host``."""
        found: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                found += [rdata.address for rdata in self._resolve(host, rdtype)]
            except DnsError:
                continue
        if not found:
            raise DnsError(f"name server {host} has no address ({self._via()})")
        return found

    def txt(self, fqdn: str) -> Observation:
        """The TXT values at ``fqdn`` through the recursive resolver."""
        try:
            answer = self._resolver.resolve(
                absolute_name(fqdn), dns.rdatatype.TXT, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return frozenset()
        except dns.exception.DNSException as error:
            return _reason(error)
        return frozenset(txt_value(rdata) for rdata in answer)

    def _resolve(self, name: dns.name.Name | str, rdtype: dns.rdatatype.RdataType) -> list[Any]:
        try:
            return list(self._resolver.resolve(name, rdtype))
        except dns.exception.DNSException as error:
            what = dns.rdatatype.to_text(rdtype)
            raise DnsError(f"no {what} for {name} ({self._via()}): {error}") from None

    def _via(self) -> str:
        if self.resolvers:
            return "via DNS_RESOLVERS " + ",".join(str(s) for s in self.resolvers)
        return "via the system resolver"


def query_txt(
    address: str, port: int, fqdn: str, *, recursion: bool, timeout: float
) -> Observation:
    """Ask one server directly for the TXT values at ``fqdn`` (TCP when UDP is truncated)."""
    query = dns.message.make_query(absolute_name(fqdn), dns.rdatatype.TXT)
    if not recursion:
        query.flags &= ~dns.flags.RD
    try:
        response, _ = dns.query.udp_with_fallback(query, address, timeout=timeout, port=port)
    except (OSError, dns.exception.DNSException) as error:
        return _reason(error)
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return dns.rcode.to_text(rcode)
    if not recursion and not response.flags & dns.flags.AA:
        # A server that is listed as NS but does not serve the zone: it cannot have it.
        return "not authoritative"
    values: set[str] = set()
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT and rrset.name == query.question[0].name:
            values.update(txt_value(rdata) for rdata in rrset)
    return frozenset(values)


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
        if self.settings.check == RESOLVERS:
            return {
                str(server): query_txt(
                    server.host, server.port, fqdn, recursion=True, timeout=self.query_timeout
                )
                for server in self.settings.resolvers
            }
        if self.settings.check == AUTHORITATIVE:
            return {
                f"{host} {_host_port(address, self.authoritative_port)}": query_txt(
                    address,
                    self.authoritative_port,
                    fqdn,
                    recursion=False,
                    timeout=self.query_timeout,
                )
                for host, address in self.authoritative_servers(fqdn)
            }
        return {"resolver": self.lookup.txt(fqdn)}

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


def _reason(error: BaseException) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "no answer"
    return str(error) or type(error).__name__
