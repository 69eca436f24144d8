"""BIND 9 (Debian's ``named``) as the authoritative server of a test zone on loopback.

Each :class:`BindServer` is one ``named -g`` process with its own directory, config, zone
file and journal, answering on one address and port (UDP and TCP), with no recursion and
dynamic updates allowed for one TSIG key. Two servers started from the same
:class:`TestZone` serve the same zone independently: an update sent to one reaches the other
only when the test sends it there too, which is how "a record that reaches the second
authoritative server later" is staged.
"""

from __future__ import annotations

import base64
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsigkeyring
import dns.update

from tests.support.lifecycle import StartStop
from tests.support.ports import free_tcp_udp_port, release

NAMED = "/usr/sbin/named"
NSUPDATE = "/usr/bin/nsupdate"
START_TIMEOUT = 15.0
STOP_GRACE = 5.0
QUERY_TIMEOUT = 3.0


@dataclass(frozen=True)
class TsigKey:
    name: str
    secret: str
    algorithm: str = "hmac-sha256"

    @classmethod
    def generate(cls, name: str = "acme-test-key") -> TsigKey:
        return cls(name, base64.b64encode(secrets.token_bytes(32)).decode())


@dataclass(frozen=True)
class TestZone:
    """A zone with its name servers (``ns1``, ``ns2``, ...) at the given addresses."""

    __test__ = False

    name: str = "example.test"
    nameserver_addresses: Sequence[str] = ("127.0.0.1",)
    key: TsigKey = field(default_factory=TsigKey.generate)
    # Short negative TTL: resolvers caching "no such record" forget it quickly.
    negative_ttl: int = 1

    def nameservers(self) -> list[tuple[str, str]]:
        """(host name, address) of each name server, in NS order."""
        return [
            (f"ns{i}.{self.name}", address)
            for i, address in enumerate(self.nameserver_addresses, start=1)
        ]

    def zone_file(self) -> str:
        lines = [
            "$TTL 60",
            f"@ IN SOA ns1.{self.name}. hostmaster.{self.name}. "
            f"1 3600 600 86400 {self.negative_ttl}",
        ]
        for host, address in self.nameservers():
            lines.append(f"@ IN NS {host}.")
            kind = "AAAA" if ":" in address else "A"
            lines.append(f"{host}. IN {kind} {address}")
        lines.append(f"@ IN A {self.nameserver_addresses[0]}")
        return "\n".join(lines) + "\n"


class BindServer(StartStop):
    """One authoritative ``named`` for ``zone`` on ``address``:``port``."""

    __test__ = False

    def __init__(self, workdir: Path, zone: TestZone, address: str, port: int) -> None:
        self.workdir = Path(workdir).resolve()
        self.zone = zone
        self.address = address
        self.port = port
        self.log_path = self.workdir / "named.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> BindServer:
        if self._proc is not None:
            raise RuntimeError("named already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # named drops to no user here (we do not pass -u), but keep the files readable by
        # the bind user anyway in case a distribution default makes it switch.
        self.workdir.chmod(0o755)
        (self.workdir / "zone.db").write_text(self.zone.zone_file())
        conf = self.workdir / "named.conf"
        conf.write_text(self._config())
        checked = subprocess.run(
            ["/usr/bin/named-checkconf", str(conf)], capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            raise RuntimeError(f"named-checkconf: {checked.stdout}{checked.stderr}")
        log = self.log_path.open("ab")
        self._log = log
        self._proc = subprocess.Popen(
            [NAMED, "-g", "-c", str(conf), "-n", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """``host:port`` as DNS_RFC2136_SERVER / DNS_RESOLVERS / Pebble's -dnsserver take it."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- queries and updates ---------------------------------------------------------------

    def txt(self, name: str) -> set[str]:
        """The TXT values at ``name`` in this server's copy of the zone (``dig +norec``)."""
        query = dns.message.make_query(_absolute(name), dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD
        response = dns.query.tcp(query, self.address, port=self.port, timeout=QUERY_TIMEOUT)
        values: set[str] = set()
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rdata in rrset:
                    values.add(b"".join(rdata.strings).decode())
        return values

    def add_txt(self, name: str, value: str, ttl: int = 60) -> None:
        """Add one TXT value (as an operator would, by hand), signed with the zone's key."""
        update = self._update()
        update.add(_absolute(name), ttl, _txt(value))
        self._send(update)

    def delete_txt(self, name: str, value: str) -> None:
        update = self._update()
        update.delete(_absolute(name), _txt(value))
        self._send(update)

    def nsupdate_script(self) -> str:
        """An nsupdate "server" line and key for this server: for exec-provider scripts."""
        key = self.zone.key
        return f"server {self.address} {self.port}\nkey {key.algorithm}:{key.name} {key.secret}\n"

    # -- internals -------------------------------------------------------------------------

    def _update(self) -> dns.update.UpdateMessage:
        key = self.zone.key
        keyring = dns.tsigkeyring.from_text({key.name: (key.algorithm, key.secret)})
        return dns.update.UpdateMessage(
            _absolute(self.zone.name), keyring=keyring, keyname=dns.name.from_text(key.name)
        )

    def _send(self, update: dns.update.UpdateMessage) -> None:
        response = dns.query.tcp(update, self.address, port=self.port, timeout=QUERY_TIMEOUT)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"update refused: {dns.rcode.to_text(response.rcode())}")

    def _config(self) -> str:
        key = self.zone.key
        ipv6 = ":" in self.address
        listen = (
            f"listen-on {{ none; }};\n    listen-on-v6 port {self.port} {{ {self.address}; }};"
            if ipv6
            else f"listen-on port {self.port} {{ {self.address}; }};\n    listen-on-v6 {{ none; }};"
        )
        return f"""
key "{key.name}" {{
    algorithm {key.algorithm};
    secret "{key.secret}";
}};
controls {{ }};
options {{
    directory "{self.workdir}";
    pid-file "{self.workdir}/named.pid";
    session-keyfile "{self.workdir}/session.key";
    managed-keys-directory "{self.workdir}";
    {listen}
    recursion no;
    allow-query {{ any; }};
    allow-transfer {{ none; }};
    notify no;
    dnssec-validation no;
    minimal-responses no;
}};
zone "{self.zone.name}" {{
    type primary;
    file "{self.workdir}/zone.db";
    journal "{self.workdir}/zone.db.jnl";
    allow-update {{ key "{key.name}"; }};
}};
"""

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"named exited with {self._proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                query = dns.message.make_query(_absolute(self.zone.name), dns.rdatatype.SOA)
                response = dns.query.udp(query, self.address, port=self.port, timeout=0.5)
                if response.rcode() == dns.rcode.NOERROR and response.answer:
                    return
                last = dns.rcode.to_text(response.rcode())
            except (OSError, dns.exception.DNSException) as error:
                last = repr(error)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"named on {self.server} not answering within {START_TIMEOUT} s "
                    f"(last: {last}):\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)


def start_bind_servers(
    workdir: Path, zone: TestZone, port: int, addresses: Iterable[str] | None = None
) -> list[BindServer]:
    """One server per name server address of ``zone``, all on ``port``; stop them after."""
    started: list[BindServer] = []
    try:
        for i, address in enumerate(addresses or zone.nameserver_addresses, start=1):
            started.append(BindServer(workdir / f"ns{i}", zone, address, port).start())
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started


def start_zone_server(workdir: Path, name: str, negative_ttl: int = 1) -> BindServer:
    """One BIND on 127.0.0.1, on a free port, authoritative for the test zone ``name``."""
    zone = TestZone(name, ("127.0.0.1",), negative_ttl=negative_ttl)
    (server,) = start_bind_servers(workdir, zone, free_dns_port(["127.0.0.1"]))
    return server


def port_free_on(addresses: Iterable[str], port: int) -> bool:
    """Whether ``port`` is free for UDP and TCP on every address (53 is, on test machines)."""
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(family, kind) as sock:
                try:
                    sock.bind((address, port))
                except OSError:
                    return False
    return True


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name if name.endswith(".") else name + ".")


def _txt(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])


def free_dns_port(addresses: Iterable[str]) -> int:
    """A port free for UDP and TCP on every one of ``addresses`` a moment ago."""
    wanted = list(addresses)
    for _ in range(100):
        port = free_tcp_udp_port()  # reserved, below the ephemeral range (tests.support.ports)
        if port_free_on(wanted, port):
            return port
        release(port)
    raise RuntimeError(f"no port free on all of {wanted}")


# A DNS_EXEC_COMMAND as an operator would write it: lego's convention, nsupdate underneath.
NSUPDATE_HOOK = f"""#!/bin/sh
set -eu
action="$1" fqdn="$2" value="$3"
case "$action" in
  present) verb=add; ttl=60 ;;
  cleanup) verb=delete; ttl= ;;
  *) echo "unknown action $action" >&2; exit 64 ;;
esac
{{
  echo "server $HOOK_SERVER $HOOK_PORT"
  echo "key $HOOK_KEY"
  echo "update $verb $fqdn $ttl TXT \\"$value\\""
  echo "send"
}} | {NSUPDATE}
echo "$action $fqdn" >> "$HOOK_LOG"
"""


def write_nsupdate_hook(directory: Path, server: BindServer) -> tuple[Path, dict[str, str]]:
    """An exec-provider script updating ``server`` with nsupdate, and the environment it needs.

    The script appends "<action> <fqdn>" to the file named by HOOK_LOG after each success.
    """
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "dns-hook"
    script.write_text(NSUPDATE_HOOK)
    script.chmod(0o755)
    key = server.zone.key
    env = {
        "PATH": "/usr/bin:/bin",
        "HOOK_SERVER": server.address,
        "HOOK_PORT": str(server.port),
        "HOOK_KEY": f"{key.algorithm}:{key.name} {key.secret}",
        "HOOK_LOG": str(directory / "hook.log"),
    }
    return script, env
