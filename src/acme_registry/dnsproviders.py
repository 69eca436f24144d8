"""Putting a challenge's TXT record into DNS and taking it out again.

A :class:`DnsProvider` adds one value to the TXT set at a name (``present``) and removes
exactly that value (``cleanup``). A name and its wildcard (``example.com``,
``*.example.com``) share ``_acme-challenge.example.com`` with two values at once, so a
provider never replaces the set and never deletes a value it did not add. Both operations
are idempotent: adding a value that is there, or removing one that is gone, succeeds, so an
order resumed after a crash can clean up what it left.

Every failure is a :class:`DnsError` whose text is fit for the log and ``status``: it names
the server or command and what went wrong, and never holds the TSIG secret.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import dns.update

from .dnsconfig import ExecSettings, HostPort, Rfc2136Settings
from .dnslookup import DnsError, DnsLookup, absolute_name

DEFAULT_TTL = 60
DEFAULT_QUERY_TIMEOUT = 10.0
DEFAULT_EXEC_TIMEOUT = 120.0
STDERR_TAIL_CHARS = 400
# The agent's own secrets, kept out of an exec hook's environment (it brings its own).
EXEC_HIDDEN_VARIABLES = (
    "ACME_EAB_HMAC_KEY",
    "ACME_EAB_HMAC_KEY_FILE",
    "DNS_RFC2136_TSIG_SECRET",
    "DNS_RFC2136_TSIG_SECRET_FILE",
    "AUTH_USERS",
    "AUTH_USERS_FILE",
)
# TXT character-strings hold at most 255 bytes each; longer values are split (and the
# reader joins them, as RFC 7208 3.3 and the ACME drafts say).
TXT_STRING_MAX = 255


class DnsProvider(Protocol):
    """Adds and removes one TXT value at a name; ``fqdn`` may end with a dot or not."""

    def present(self, fqdn: str, value: str) -> None: ...

    def cleanup(self, fqdn: str, value: str) -> None: ...


def txt_rdata(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    """One TXT record holding ``value`` (split into 255-byte strings when longer)."""
    data = value.encode()
    chunks = [data[i : i + TXT_STRING_MAX] for i in range(0, len(data), TXT_STRING_MAX)]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks or [b""])


def server_addresses(server: HostPort, lookup: DnsLookup | None = None) -> list[str]:
    """The IP addresses of ``server`` (itself when it is one), IPv4 first.

    Through ``lookup`` (DNS_RESOLVERS) when given, else the system's resolver.
    """
    if lookup is not None:
        return lookup.addresses(server.host)
    try:
        infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise DnsError(f"cannot resolve DNS server {server.host}: {error.strerror}") from None
    addresses: list[str] = []
    for family, *_, sockaddr in sorted(infos, key=lambda info: info[0] != socket.AF_INET):
        address = str(sockaddr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and address not in addresses:
            addresses.append(address)
    return addresses


class Rfc2136Provider:
    """Dynamic updates (RFC 2136) to one server, signed with TSIG (RFC 8945).

    The zone is ``DNS_RFC2136_ZONE`` or, when unset, found from the SOA. With
    ``DNS_RESOLVERS`` (``resolvers``) set, the SOA is looked up through them, like every
    other lookup the agent makes, and so is the update server's address when
    ``DNS_RFC2136_SERVER`` is a host name. Without, the update server itself is asked for
    the SOA of the record's name and of each parent in turn: it must be authoritative for
    the zone anyway (it is the one accepting the update), so its answer is the one that
    matters, even behind a split horizon. Found zones are remembered.
    """

    def __init__(
        self,
        settings: Rfc2136Settings,
        *,
        resolvers: Sequence[HostPort] = (),
        ttl: int = DEFAULT_TTL,
        timeout: float = DEFAULT_QUERY_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.ttl = ttl
        self.timeout = timeout
        self._lookup = DnsLookup(resolvers) if resolvers else None
        self._keyname = dns.name.from_text(settings.key_name + ".")
        self._keyring = {
            self._keyname: dns.tsig.Key(
                self._keyname, settings.secret, algorithm=settings.algorithm_name
            )
        }
        self._zones: dict[dns.name.Name, dns.name.Name] = {}

    def __repr__(self) -> str:
        return f"Rfc2136Provider(server={self.settings.server}, key={self.settings.key_name})"

    def present(self, fqdn: str, value: str) -> None:
        name = absolute_name(fqdn)
        update = self._update(name)
        # "add" joins the existing RRset (RFC 2136 2.5.1): the other values stay.
        update.add(name, self.ttl, txt_rdata(value))
        self._send(update, f"adding TXT at {name}")

    def cleanup(self, fqdn: str, value: str) -> None:
        name = absolute_name(fqdn)
        update = self._update(name)
        # Deleting one RR by its rdata (RFC 2136 2.5.4) leaves the rest of the set alone.
        update.delete(name, txt_rdata(value))
        self._send(update, f"removing TXT at {name}")

    def zone_for(self, fqdn: str) -> str:
        """The zone the update for ``fqdn`` goes to, with a trailing dot."""
        return self._zone(absolute_name(fqdn)).to_text()

    # -- internals -------------------------------------------------------------------------

    def _update(self, name: dns.name.Name) -> dns.update.UpdateMessage:
        zone = self._zone(name)
        if not name.is_subdomain(zone):
            raise DnsError(f"{name} is not inside DNS_RFC2136_ZONE {zone}")
        return dns.update.UpdateMessage(
            zone,
            keyring=self._keyring,
            keyname=self._keyname,
            keyalgorithm=self.settings.algorithm_name,
        )

    def _zone(self, name: dns.name.Name) -> dns.name.Name:
        if self.settings.zone:
            return dns.name.from_text(self.settings.zone + ".")
        if name not in self._zones:
            self._zones[name] = self._find_zone(name)
        return self._zones[name]

    def _find_zone(self, name: dns.name.Name) -> dns.name.Name:
        if self._lookup is not None:
            try:
                return self._lookup.zone_of(name)
            except DnsError as error:
                raise DnsError(f"{error}: set DNS_RFC2136_ZONE or fix DNS_RESOLVERS") from None
        candidate = name
        while candidate != dns.name.root:
            query = dns.message.make_query(candidate, dns.rdatatype.SOA)
            query.flags &= ~dns.flags.RD
            response = self._exchange(query, f"looking up the SOA of {candidate}")
            if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                for rrset in response.answer:
                    if rrset.rdtype == dns.rdatatype.SOA and rrset.name == candidate:
                        return candidate
                # Below the apex, an authoritative server names its zone in the SOA it
                # puts in the authority section of a negative answer.
                if response.flags & dns.flags.AA:
                    for rrset in response.authority:
                        if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
                            return rrset.name
            candidate = candidate.parent()
        raise DnsError(
            f"{self.settings.server} is not authoritative for any zone above {name}: "
            "set DNS_RFC2136_ZONE"
        )

    def _send(self, update: dns.update.UpdateMessage, action: str) -> None:
        response = self._exchange(update, action)
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            hint = ""
            if rcode in (dns.rcode.REFUSED, dns.rcode.NOTAUTH):
                hint = " (check the key's allow-update / update-policy and DNS_RFC2136_ZONE)"
            raise DnsError(
                f"{self.settings.server} refused {action}: {dns.rcode.to_text(rcode)}{hint}"
            )

    def _exchange(self, message: dns.message.Message, action: str) -> dns.message.Message:
        server = self.settings.server
        last: Exception | None = None
        for address in server_addresses(server, self._lookup):
            try:
                return dns.query.tcp(message, address, port=server.port, timeout=self.timeout)
            except dns.tsig.PeerBadSignature:
                raise DnsError(
                    f"{server} rejected the TSIG signature while {action} (BADSIG): "
                    "DNS_RFC2136_TSIG_SECRET does not match the server's key "
                    f"{self.settings.key_name}"
                ) from None
            except dns.tsig.PeerBadKey:
                raise DnsError(
                    f"{server} does not know TSIG key {self.settings.key_name} "
                    f"({self.settings.algorithm}) while {action} (BADKEY): check "
                    "DNS_RFC2136_TSIG_KEY_NAME and DNS_RFC2136_TSIG_ALGORITHM"
                ) from None
            except dns.tsig.PeerBadTime:
                raise DnsError(
                    f"{server} rejected the TSIG time while {action} (BADTIME): "
                    "this machine's clock and the server's differ"
                ) from None
            except dns.tsig.PeerError as error:
                raise DnsError(f"{server}: TSIG error while {action}: {error}") from None
            except (OSError, dns.exception.DNSException) as error:
                last = error
        reason = "timed out" if isinstance(last, dns.exception.Timeout) else str(last)
        raise DnsError(f"{server} did not answer while {action}: {reason}")


class ExecProvider:
    """Runs ``COMMAND present <fqdn> <value>`` and ``COMMAND cleanup <fqdn> <value>``.

    The convention of lego's exec provider: ``fqdn`` is absolute (ends with a dot), ``value``
    is the TXT value as the CA will look it up. A non-zero exit, a timeout or a command that
    cannot be started is a :class:`DnsError` with the exit status and the end of stderr.
    """

    def __init__(
        self,
        command: Path,
        *,
        timeout: float = DEFAULT_EXEC_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = command
        self.timeout = timeout
        # The script usually needs its own credentials from the environment, as lego's does;
        # it gets everything but the agent's own secrets.
        source = os.environ if env is None else env
        self.env = {k: v for k, v in source.items() if k not in EXEC_HIDDEN_VARIABLES}

    def __repr__(self) -> str:
        return f"ExecProvider({self.command})"

    def present(self, fqdn: str, value: str) -> None:
        self._run("present", fqdn, value)

    def cleanup(self, fqdn: str, value: str) -> None:
        self._run("cleanup", fqdn, value)

    def _run(self, action: str, fqdn: str, value: str) -> None:
        name = absolute_name(fqdn).to_text()
        what = f"{self.command} {action} {name}"
        try:
            result = subprocess.run(
                [str(self.command), action, name, value],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=self.timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            tail = _tail(error.stderr)
            raise DnsError(f"{what}: did not finish within {self.timeout:g} s{tail}") from None
        except OSError as error:
            raise DnsError(f"{what}: cannot run: {error.strerror}") from None
        if result.returncode != 0:
            status = (
                f"killed by signal {-result.returncode}"
                if result.returncode < 0
                else f"exit status {result.returncode}"
            )
            raise DnsError(f"{what}: {status}{_tail(result.stderr)}")


def _tail(stderr: bytes | str | None) -> str:
    """The end of a command's stderr as one line, for a message (empty when there is none)."""
    if not stderr:
        return ""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    joined = " | ".join(lines)
    if len(joined) > STDERR_TAIL_CHARS:
        joined = "..." + joined[-STDERR_TAIL_CHARS:]
    return f": {joined}" if joined else ""


def provider_for(
    settings: Rfc2136Settings | ExecSettings, resolvers: Sequence[HostPort] = ()
) -> DnsProvider:
    """The provider the settings describe (``DnsSettings.provider``, set with dns-01).

    ``resolvers``: DNS_RESOLVERS, for the rfc2136 provider's own lookups.
    """
    if isinstance(settings, Rfc2136Settings):
        return Rfc2136Provider(settings, resolvers=resolvers)
    return ExecProvider(settings.command)
