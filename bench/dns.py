"""DNS validation (issue 10): dns-01 against http-01, and against certbot's RFC 2136 plugin.

One BIND 9 (Debian's ``named``) is the authoritative server of the zone ``registry.test`` on
a loopback port for the whole part, with TSIG-signed updates allowed; its zone's apex A
record is 127.0.0.1. Every round gives each path a fresh Pebble 2.10 (not timed) whose
validator resolves through that BIND (``-dnsserver``), so every path proves the same name
to the same kind of CA through the same DNS:

- ``http01``: ``acme-registry run`` with HTTP-01 (Pebble reaches the agent's port 80 through
  the A record);
- ``dns01``: ``acme-registry run`` with ``ACME_CHALLENGE=dns-01``, ``DNS_PROVIDER=rfc2136`` to
  the BIND, ``DNS_PROPAGATION_CHECK=resolvers`` asking that BIND (the zone exists nowhere
  else), and ``ACME_HTTP_PORT=off``: no port-80 listener at all;
- ``certbot``: ``certbot certonly --authenticator dns-rfc2136`` (Debian's
  ``python3-certbot-dns-rfc2136``) with the same key, then the registry binary on what it
  wrote, as the tutorials do. The plugin waits a fixed ``--dns-rfc2136-propagation-seconds``
  (default 60) after adding the record instead of looking: ``certbot`` keeps that default,
  ``certbot_nowait`` sets it to 0 (the floor of the plugin's own work; with a real secondary
  that has not caught up, a failed validation).

Times are from the spawn of the path's first process to the first ``200`` on ``GET /v2/``
over TLS verified against the Pebble root, polled every 10 ms. Paths run one after the
other in alternating order (A B C D, then D C B A). Run alone:
``.venv/bin/python -m bench --only dns``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench.setups import NAME, CertbotRegistry, Ours, wait_for_v2
from tests.support.bind import BindServer, TestZone, free_dns_port, start_bind_servers
from tests.support.pebble_dns import PebbleWithDns
from tests.support.ports import free_port

PATHS = ("http01", "dns01", "certbot_nowait", "certbot")
LABELS = {
    "http01": "acme-registry, http-01",
    "dns01": "acme-registry, dns-01 (rfc2136)",
    "certbot_nowait": "certbot dns-rfc2136, propagation-seconds 0",
    "certbot": "certbot dns-rfc2136, its default wait (60 s)",
}
TIMEOUT = 180.0
CERTBOT_DEFAULT_WAIT = 60
_ISSUANCE_SUM = re.compile(r"^acme_registry_issuance_duration_seconds_sum\s+(\S+)", re.M)


def _pebble(workdir: Path, bind: BindServer) -> PebbleWithDns:
    # A port for HTTP-01: the http01 path's agent listens there, the others leave it closed.
    return PebbleWithDns(workdir, bind.server, http_port=free_port()).start()


def _issuance_metric(ours: Ours) -> float | None:
    try:
        text = requests.get(f"{ours.agent.admin_url}/metrics", timeout=5).text
    except requests.RequestException:
        return None
    found = _ISSUANCE_SUM.search(text)
    return float(found.group(1)) if found else None


def _ours_round(workdir: Path, bind: BindServer, dns01: bool) -> dict[str, Any]:
    extra: dict[str, str] = {}
    if dns01:
        key = bind.zone.key
        extra = {
            "ACME_CHALLENGE": "dns-01",
            "DNS_PROVIDER": "rfc2136",
            "DNS_RFC2136_SERVER": bind.server,
            "DNS_RFC2136_TSIG_KEY_NAME": key.name,
            "DNS_RFC2136_TSIG_SECRET": key.secret,
            "DNS_PROPAGATION_CHECK": "resolvers",
            "DNS_RESOLVERS": bind.server,
            "ACME_HTTP_PORT": "off",
        }
    pebble = _pebble(workdir / "pebble", bind)
    try:
        ours = Ours(workdir / "ours", pebble, workdir / "storage", **extra)
        started = time.monotonic()
        ours.start()
        try:
            first = wait_for_v2(ours.port, ours.root_pem, timeout=TIMEOUT) - started
            issue = _issuance_metric(ours)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n{ours.agent.log()[-3000:]}") from exc
        finally:
            ours.stop()
    finally:
        pebble.stop()
    return {"first": first, "issue": issue}


def _certbot_round(workdir: Path, bind: BindServer, wait: int | None) -> dict[str, Any]:
    pebble = _pebble(workdir / "pebble", bind)
    try:
        certbot = CertbotRegistry(workdir / "certbot", pebble, workdir / "storage")
        credentials = workdir / "rfc2136.ini"
        key = bind.zone.key
        credentials.write_text(
            f"dns_rfc2136_server = {bind.address}\n"
            f"dns_rfc2136_port = {bind.port}\n"
            f"dns_rfc2136_name = {key.name}\n"
            f"dns_rfc2136_secret = {key.secret}\n"
            f"dns_rfc2136_algorithm = {key.algorithm.upper()}\n"
        )
        credentials.chmod(0o600)  # certbot warns about credentials others can read
        flags = ["--authenticator", "dns-rfc2136", "--dns-rfc2136-credentials", str(credentials)]
        if wait is not None:
            flags += ["--dns-rfc2136-propagation-seconds", str(wait)]
        started = time.monotonic()
        certbot.run_certbot(flags)
        issue = time.monotonic() - started
        certbot.start()
        try:
            first = wait_for_v2(certbot.port, certbot.root_pem, timeout=TIMEOUT) - started
        finally:
            certbot.stop()
    finally:
        pebble.stop()
    return {"first": first, "issue": issue}


ROUNDS: dict[str, Callable[[Path, BindServer], dict[str, Any]]] = {
    "http01": lambda w, b: _ours_round(w, b, dns01=False),
    "dns01": lambda w, b: _ours_round(w, b, dns01=True),
    "certbot_nowait": lambda w, b: _certbot_round(w, b, wait=0),
    "certbot": lambda w, b: _certbot_round(w, b, wait=None),
}


def run(workdir: Path, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``rounds`` cold starts of every path against one BIND, alternating their order."""
    zone = TestZone(NAME, ("127.0.0.1",))
    (bind,) = start_bind_servers(workdir / "bind", zone, free_dns_port(["127.0.0.1"]))
    results: dict[str, dict[str, list[Any]]] = {path: {} for path in PATHS}
    errors: list[str] = []
    try:
        for index in range(rounds):
            order = PATHS if index % 2 == 0 else PATHS[::-1]
            for path in order:
                folder = workdir / f"dns-{index}-{path}"
                try:
                    result = ROUNDS[path](folder, bind)
                except Exception as exc:  # one failed round must not lose the others
                    errors.append(f"round {index + 1}, {path}: {type(exc).__name__}: {exc}"[:800])
                    log(f"  dns round {index + 1} {path}: FAILED {exc}")
                    continue
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                for key, value in result.items():
                    results[path].setdefault(key, []).append(value)
                log(f"  dns round {index + 1} {path}: first verified 200 {result['first']:.3f} s")
        leftover = bind.txt(f"_acme-challenge.{NAME}")
    finally:
        bind.stop()
    return {
        "rounds": rounds,
        "paths": results,
        "errors": errors,
        "records_left": sorted(leftover),
        "bind": bind.server,
    }


def firsts(results: dict[str, Any], path: str) -> list[float]:
    return [v for v in results["dns"]["paths"].get(path, {}).get("first", []) if v is not None]


def issues(results: dict[str, Any], path: str) -> list[float]:
    return [v for v in results["dns"]["paths"].get(path, {}).get("issue", []) if v is not None]


def section(results: dict[str, Any]) -> str:
    """The report's DNS section: one table of medians and ratios, and what it means."""
    from bench.report import med, ratio, sec, spread, table  # report imports this module

    d = results["dns"]
    dns01 = med(firsts(results, "dns01"))
    rows = []
    for path in PATHS:
        values = firsts(results, path)
        rows.append(
            (
                LABELS[path],
                str(len(values)),
                spread(values, sec),
                ratio(med(values), dns01),
                spread(issues(results, path), sec),
            )
        )
    http01 = med(firsts(results, "http01"))
    nowait = med(firsts(results, "certbot_nowait"))
    waiting = med(firsts(results, "certbot"))
    text = [
        "Time from the spawn of a path's first process to the first `200` on `GET /v2/` over "
        "verified TLS, from empty directories (`bench/dns.py`). One BIND 9 "
        f"(`named`, {results['machine']['versions'].get('bind9', '?')}) is the authoritative "
        f"server of `{NAME}` for the whole part; every round gives each path a fresh Pebble "
        "2.10 resolving through it (`-dnsserver`; 5 % `badNonce`, `PEBBLE_VA_NOSLEEP=1`), so "
        "every path proves the same name through the same DNS. acme-registry's dns-01 writes "
        "the record with `DNS_PROVIDER=rfc2136`, checks it with `DNS_PROPAGATION_CHECK="
        "resolvers` against that BIND, and runs with `ACME_HTTP_PORT=off`; its http-01 path is "
        "validated through the zone's A record. certbot "
        f"({results['machine']['versions'].get('certbot', '?')}, plugin "
        f"{results['machine']['versions'].get('python3-certbot-dns-rfc2136', '?')}) runs "
        "`certonly --authenticator dns-rfc2136` with the same TSIG key, then the registry "
        "binary on what it wrote. *Issuance*: ours the agent's "
        "`acme_registry_issuance_duration_seconds`, certbot its whole run. Medians "
        f"(min-max) of {d['rounds']} rounds.",
        "",
        table(("path", "rounds", "first verified 200", "x dns-01", "issuance"), rows),
        "",
        f"dns-01 against http-01: {ratio(dns01, http01)}x ({sec(dns01)} against "
        f"{sec(http01)}): with one authoritative server the propagation check costs one query "
        "per record. certbot with its default wait takes "
        f"{ratio(waiting, dns01)}x as long as ours: after adding the record the plugin sleeps "
        "`--dns-rfc2136-propagation-seconds` (60 s unless told otherwise) whether the record "
        "is visible or not, where the agent asks the servers until they show it and then "
        "tells the CA. With the wait set to 0 certbot still takes "
        f"{ratio(nowait, dns01)}x: that is certbot's own run (process start, account, order, "
        "polling), not split up here; and a wait too short for a real secondary spends a "
        "failed validation (rate-limited at Let's Encrypt) on a record that has not reached "
        "every server.",
    ]
    if d.get("records_left"):
        text += ["", f"TXT values left at `_acme-challenge.{NAME}`: {d['records_left']}"]
    else:
        text += ["", f"No TXT value was left at `_acme-challenge.{NAME}` after the rounds."]
    if d["errors"]:
        text += ["", "Failed rounds (not counted): " + "; ".join(e[:300] for e in d["errors"])]
    return "\n".join(text)


def goal_row(results: dict[str, Any]) -> tuple[str, str, str, str]:
    """The goals table's row: dns-01 ahead of certbot's RFC 2136 plugin in the same run."""
    from bench.report import _verdict, med

    dns01, certbot = med(firsts(results, "dns01")), med(firsts(results, "certbot"))
    met = dns01 < certbot
    return (
        "dns-01 to the first verified 200",
        "ahead of certbot's RFC 2136 plugin (its defaults) on the same BIND and Pebble",
        f"{dns01:.3f} vs {certbot:.3f} s (http-01: {med(firsts(results, 'http01')):.3f} s)",
        _verdict(met, f"{dns01 - certbot:.3f} s"),
    )


def certbot_plugin_installed() -> bool:
    """Whether Debian's python3-certbot-dns-rfc2136 (certbot's dns-rfc2136) is installed."""
    found = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", "python3-certbot-dns-rfc2136"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return found.stdout.endswith("installed")
