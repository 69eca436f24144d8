"""The agent's own DNS lookups: through ``DNS_RESOLVERS`` when set, else the system resolver.

Every recursive lookup the agent makes goes through one :class:`DnsLookup`: the zone of a
name (SOA), its name servers (NS) and their addresses (A/AAAA), the address of
``DNS_RFC2136_SERVER`` when it is a host name, and TXT records. A network with a split
horizon or blocked outbound port 53 sets ``DNS_RESOLVERS`` and then no lookup leaves through
the system's resolver.

Also here: the TTL an answer may be cached for (:func:`answer_ttl`, pure), and
:class:`DnsError`, the one error of the DNS modules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver

from .dnsconfig import HostPort

DEFAULT_QUERY_TIMEOUT = 3.0

# What one server said about a name: its TXT values, or why there is no answer.
Observation = frozenset[str] | str


class DnsError(Exception):
    """A DNS provider or propagation step failed. ``str()`` is one line for the log."""


@dataclass(frozen=True)
class TxtAnswer:
    """One server's answer for a TXT name: what it shows, and for how long it may be cached.

    ``ttl`` is the TXT records' TTL, or for "no such record" the negative-caching TTL (RFC
    2308: the SOA's TTL or its minimum field, whichever is lower); None when unknown (no
    answer, or a negative answer without an SOA).
    """

    observation: Observation
    ttl: int | None = None


def absolute_name(fqdn: str) -> dns.name.Name:
    try:
        return dns.name.from_text(fqdn if fqdn.endswith(".") else fqdn + ".")
    except dns.exception.DNSException as error:
        raise DnsError(f"{fqdn!r} is not a DNS name: {error}") from None


def txt_value(rdata: dns.rdtypes.ANY.TXT.TXT) -> str:
    """The value of one TXT record: its strings joined, as ACME validators read it."""
    return b"".join(rdata.strings).decode(errors="replace")


def answer_ttl(response: dns.message.Message, qname: dns.name.Name) -> int | None:
    """Pure: how long ``response`` (to a TXT query for ``qname``) may be cached, in seconds.

    The TTL of the TXT records at ``qname`` (following a CNAME chain's last owner is not
    needed: any TXT RRset at the end of the answer counts); for NXDOMAIN or no TXT, the
    negative TTL from the authority section's SOA: min(its TTL, its minimum field).
    """
    txt = [rrset.ttl for rrset in response.answer if rrset.rdtype == dns.rdatatype.TXT]
    if txt:
        return min(txt)
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, int(rrset[0].minimum))
    return None


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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

    def zone_of(self, fqdn: str | dns.name.Name) -> dns.name.Name:
        """The zone holding ``fqdn``: the closest enclosing name with an SOA."""
        name = fqdn if isinstance(fqdn, dns.name.Name) else absolute_name(fqdn)
        try:
            return dns.resolver.zone_for_name(name, resolver=self._resolver)
        except dns.exception.DNSException as error:
            raise DnsError(f"cannot find the zone of {name} ({self.via()}): {error}") from None

    def nameservers(self, zone: dns.name.Name) -> list[str]:
        """The NS host names of ``zone``, sorted."""
        answer = self._resolve(zone, dns.rdatatype.NS)
        return sorted(rdata.target.to_text() for rdata in answer)

    def addresses(self, host: str) -> list[str]:
        """The IPv4 then IPv6 addresses of ``host`` (itself when it is an address)."""
        if is_ip_address(host):
            return [host]
        found: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                found += [rdata.address for rdata in self._resolve(host, rdtype)]
            except DnsError:
                continue
        if not found:
            raise DnsError(f"{host} has no address ({self.via()})")
        return found

    def txt(self, fqdn: str) -> Observation:
        """The TXT values at ``fqdn`` through the recursive resolver."""
        return self.txt_answer(fqdn).observation

    def txt_answer(self, fqdn: str) -> TxtAnswer:
        """The TXT values at ``fqdn`` and their TTL, through the recursive resolver."""
        name = absolute_name(fqdn)
        try:
            answer = self._resolver.resolve(name, dns.rdatatype.TXT, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as error:
            response = error.responses().get(name)
            return TxtAnswer(frozenset(), answer_ttl(response, name) if response else None)
        except dns.exception.DNSException as error:
            return TxtAnswer(reason(error))
        values = frozenset(txt_value(rdata) for rdata in answer)
        return TxtAnswer(values, answer_ttl(answer.response, name))

    def via(self) -> str:
        """Where the lookups go, for messages."""
        if self.resolvers:
            return "via DNS_RESOLVERS " + ",".join(str(s) for s in self.resolvers)
        return "via the system resolver"

    def _resolve(self, name: dns.name.Name | str, rdtype: dns.rdatatype.RdataType) -> list[Any]:
        try:
            return list(self._resolver.resolve(name, rdtype))
        except dns.exception.DNSException as error:
            what = dns.rdatatype.to_text(rdtype)
            raise DnsError(f"no {what} for {name} ({self.via()}): {error}") from None


def reason(error: BaseException) -> str:
    """A lookup failure in a few words, for a server's column in a message."""
    if isinstance(error, dns.exception.Timeout):
        return "no answer"
    return str(error) or type(error).__name__
