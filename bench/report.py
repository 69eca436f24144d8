"""docs/benchmarks.md and its charts, from the results of one run."""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import auth_rate, gc_collect, notes, port80

MIB = 1024 * 1024
GB = 1e9
LABELS = {
    "ours": "acme-registry",
    "caddy": "Caddy + registry",
    "certbot": "certbot + registry",
    "bare": "bare registry",
}
COLORS = {"ours": "#2a7ab0", "caddy": "#d9822b", "certbot": "#7f7f7f", "bare": "#4d9f4d"}
# The figures issue 6 quotes for a machine of this kind (Caddy 2.6.2 -> registry 2.8.2).
REFERENCE = {
    "caddy_cold": 0.59,
    "caddy_warm": 0.072,
    "caddy_idle_rss_mb": 36,
    "caddy_h1_mbs": 538,
    "bare_h1_mbs": 916,
    "caddy_cpu": 0.91,
    "bare_cpu": 0.51,
    "certbot_issue": 3.2,
}
GOAL_THROUGHPUT = 0.97
GOAL_WARM = 0.3
GOAL_PSS_MIB = 36
# Marks of ours' start-up, in the order they happen (the agent's own spawn only exists while
# it runs as a supervisord program rather than in the run process).
MARKS = (
    "supervisord started",
    "agent spawned",
    "registry spawned",
    "registry listening",
    "first verified 200",
)


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], unit: Callable[[float], str]) -> str:
    if not values:
        return "-"
    return f"{unit(med(values))} ({unit(min(values))}-{unit(max(values))})"


def sec(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"


def ms_of(seconds: float | None) -> str:
    return ms(None if seconds is None else seconds * 1000)


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def ratio(a: float, b: float) -> str:
    return "-" if not b or a != a or b != b else f"{a / b:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- derived numbers (shared with notes.py) ------------------------------------------------------


def ratio_interval(
    top: Sequence[float], bottom: Sequence[float], draws: int = 2000
) -> tuple[float, float]:
    """95 % bootstrap interval of median(top) / median(bottom) (seeded: reproducible)."""
    if not top or not bottom:
        return float("nan"), float("nan")
    rng = random.Random(6)
    ratios = sorted(
        statistics.median(rng.choices(top, k=len(top)))
        / statistics.median(rng.choices(bottom, k=len(bottom)))
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def speeds(results: dict[str, Any], key: str, proto: str) -> list[float]:
    return [s["speed"] / 1e6 for s in results["data"]["get"][key][proto]]


def cpu_per_gb(
    results: dict[str, Any], key: str, proto: str, group: str | None = None
) -> list[float]:
    out = []
    for s in results["data"]["get"][key][proto]:
        cpu = s["cpu"][group] if group else sum(s["cpu"].values())
        out.append(cpu / s["bytes"] * GB)
    return out


def startup_values(results: dict[str, Any], key: str, field: str) -> list[float]:
    return [v for v in results["startup"]["paths"].get(key, {}).get(field, []) if v is not None]


def renewal_run(results: dict[str, Any], path: str, kind: str) -> dict[str, Any] | None:
    for run in results.get("renewal", {}).get("runs", []):
        if run["path"] == path and run["kind"] == kind:
            return dict(run)
    return None


def added_memory(results: dict[str, Any], key: str, when: str = "memory_idle") -> tuple[int, int]:
    group = results.get(when, {}).get(key, {}).get("added")
    return (group["rss"], group["pss"]) if group else (0, 0)


def loaded_memory(results: dict[str, Any], key: str) -> tuple[int, int]:
    run = renewal_run(results, key, "baseline")
    if not run or "added" not in run["memory_peak"]:
        return (0, 0)
    peak = run["memory_peak"]["added"]
    return (peak["rss"], peak["pss"])


def renewing_memory(results: dict[str, Any], key: str) -> tuple[int, int]:
    """Peak of what is added while renewing: ours sampled at 20 ms around `acme-registry
    renew` (its order may run in a child), Caddy's during its renewal run under load."""
    if key == "ours":
        peak = results.get("renewal", {}).get("memory_during_renewal", {}).get("peak")
    else:
        run = renewal_run(results, key, "renewal")
        peak = run["memory_peak"].get("added") if run else None
    return (peak["rss"], peak["pss"]) if peak else (0, 0)


# -- charts --------------------------------------------------------------------------------------


def _charts(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def bars(ax: Any, keys: Sequence[str], series: Sequence[Sequence[float]], title: str) -> None:
        medians = [med(v) for v in series]
        low = [m - min(v) if v else 0 for m, v in zip(medians, series, strict=True)]
        high = [max(v) - m if v else 0 for m, v in zip(medians, series, strict=True)]
        ax.bar(
            [LABELS[k] for k in keys],
            medians,
            yerr=[low, high],
            capsize=4,
            color=[COLORS[k] for k in keys],
        )
        for index, value in enumerate(medians):
            if value == value:
                ax.annotate(
                    f"{value:.4g}",
                    (index + 0.12, value),
                    textcoords="offset points",
                    xytext=(2, 2),
                    ha="left",
                    fontsize=8,
                )
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)

    if "startup" in results:
        keys = ("ours", "caddy", "certbot")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        bars(
            axes[0],
            keys,
            [startup_values(results, k, "cold") for k in keys],
            "Cold start to first verified 200 (s)",
        )
        bars(
            axes[1],
            keys,
            [startup_values(results, k, "warm") for k in keys],
            "Start with a stored certificate (s)",
        )
        axes[1].axhline(GOAL_WARM, color="red", linestyle="--", linewidth=1)
        fig.suptitle("median, bars span min-max", fontsize=8)
        fig.tight_layout()
        written["startup"] = folder / "bench-startup.png"
        fig.savefig(written["startup"], dpi=110)
        plt.close(fig)

    if "data" in results:
        keys = ("ours", "caddy", "bare")
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
        for column, proto, name in ((0, "h1", "HTTP/1.1"), (1, "h2", "HTTP/2")):
            bars(
                axes[column],
                keys,
                [speeds(results, k, proto) for k in keys],
                f"Blob GET {name} (MB/s)",
            )
            bars(
                axes[column + 2],
                keys,
                [cpu_per_gb(results, k, proto) for k in keys],
                f"Server CPU per GB, {name} (s)",
            )
        fig.tight_layout()
        written["data"] = folder / "bench-datapath.png"
        fig.savefig(written["data"], dpi=110)
        plt.close(fig)

    if "renewal" in results:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        series = (
            ("no renewal, whole run", "baseline", "p99", 0.6),
            ("no renewal, same windows", "baseline", "p99_windows", 0.45),
            ("renewing, whole run", "renewal", "p99", 1.0),
            ("renewing, during renewals", "renewal", "p99_windows", 0.8),
        )
        width = 0.2
        paths = ("ours", "caddy")
        for offset, (name, kind, field, alpha) in enumerate(series):
            for index, path in enumerate(paths):
                run = renewal_run(results, path, kind)
                value = (run or {}).get(field)
                x = index + (offset - 1.5) * width
                if value is None:  # Caddy renews after its no-renewal run would have ended
                    ax.annotate(
                        name.replace(", ", "\n") + "\n(n/a)",
                        (x, 0),
                        textcoords="offset points",
                        xytext=(0, 3),
                        ha="center",
                        fontsize=6,
                    )
                    continue
                ax.bar(
                    x,
                    value,
                    width,
                    color=COLORS[path],
                    alpha=alpha,
                    hatch="//" if kind == "renewal" else None,
                    edgecolor="black",
                )
                ax.annotate(
                    name.replace(", ", "\n"),
                    (x, value),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize=6,
                )
        for index, path in enumerate(paths):
            run = renewal_run(results, path, "renewal")
            if run:
                ax.annotate(
                    f"{run['failed']} failed / {run['requests']} requests, "
                    f"{run['events']} renewals",
                    (index, 0),
                    textcoords="offset points",
                    xytext=(0, -28),
                    ha="center",
                    fontsize=8,
                    annotation_clip=False,
                )
        ax.set_xticks(range(len(paths)), [LABELS[p] for p in paths])
        ax.set_ylabel("manifest GET p99 (ms)")
        ax.set_title("p99 latency under steady load, with and without renewals", fontsize=10)
        ax.margins(y=0.2)
        fig.tight_layout()
        written["renewal"] = folder / "bench-renewal.png"
        fig.savefig(written["renewal"], dpi=110)
        plt.close(fig)

    if "memory_idle" in results:
        fig, ax = plt.subplots(figsize=(10, 3.8))
        labels = [
            "idle RSS",
            "idle PSS",
            "under load RSS",
            "under load PSS",
            "renewing RSS",
            "renewing PSS",
        ]
        width = 0.38
        for offset, key in ((-width / 2, "ours"), (width / 2, "caddy")):
            idle = added_memory(results, key)
            load = loaded_memory(results, key)
            renewing = renewing_memory(results, key)
            values = [v / MIB for v in (*idle, *load, *renewing)]
            positions = [i + offset for i in range(len(labels))]
            name = "acme-registry (all it adds)" if key == "ours" else "Caddy"
            ax.bar(positions, values, width, label=name, color=COLORS[key])
            for x, v in zip(positions, values, strict=True):
                ax.annotate(
                    f"{v:.1f}",
                    (x, v),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize=8,
                )
        ax.axhline(GOAL_PSS_MIB, color="red", linestyle="--", linewidth=1, label="goal: 36 MiB")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title("Memory beside the registry (MiB)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["memory"] = folder / "bench-memory.png"
        fig.savefig(written["memory"], dpi=110)
        plt.close(fig)
    return written


# -- markdown ------------------------------------------------------------------------------------


def _machine(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    rows = [
        ("date", m["date"]),
        ("`nproc`", str(m["nproc"])),
        ("CPU", m["cpu"]),
        ("memory", f"{m['memory_bytes'] / 2**30:.1f} GiB"),
        ("kernel", m["kernel"]),
        ("OS", m["os"]),
        ("Python", m["python"]),
        ("registry (Debian `docker-registry`)", v.get("docker-registry", "-")),
        ("Caddy (Debian `caddy`)", v.get("caddy", "-")),
        ("certbot (Debian `certbot`)", v.get("certbot", "-")),
        (
            "certbot's RFC 2136 plugin / BIND (Debian)",
            f"{v.get('python3-certbot-dns-rfc2136', '-')} / {v.get('bind9', '-')}",
        ),
        ("Pebble (Debian bookworm)", v.get("pebble", "-")),
        (
            "Pebble (Debian sid, Caddy's short certificates)",
            v.get("pebble (sid, for short certificates)", "-"),
        ),
        ("skopeo / curl", f"{v.get('skopeo', '-')} / {v.get('curl', '-')}"),
        (
            "acme / supervisor (PyPI)",
            f"{v.get('acme (PyPI)', '-')} / {v.get('supervisor (PyPI)', '-')}",
        ),
        ("acme-registry commit", m.get("commit") or "-"),
        (
            "load average (1 min) before / after the run",
            f"{m['load_before']:.2f} / {results.get('load_after', float('nan')):.2f}",
        ),
        ("run time", f"{results.get('seconds', 0) / 60:.1f} min"),
        ("command", f"`{results['command']}` (what `make bench` runs)"),
    ]
    return table(("", ""), rows, "ll")


def _setup_text(results: dict[str, Any]) -> str:
    renewal = results.get("renewal", {})
    validity = renewal.get("caddy_validity", "?")
    return f"""\
- **acme-registry**: `acme-registry run` (supervisord, the agent, registry generations)
  with `AUTH_MODE=none`, ACME (HTTP-01) against Pebble.
- **Caddy + registry**: `caddy run --config Caddyfile` (Debian's package; its systemd unit
  plays no part), automatic HTTPS for `registry.test` with its own ACME against Pebble
  (`issuer acme {{ dir ...; trusted_roots <Pebble's listener CA>; disable_tlsalpn_challenge }}`,
  `http_port` = Pebble's `httpPort`, so HTTP-01 only), `reverse_proxy` to the registry
  binary on plain HTTP. No admin endpoint, no OCSP stapling.
- **certbot + registry**: `certbot certonly --standalone --server <Pebble> --http-01-port <p>`
  (the old tutorial's way), then the registry binary serving TLS with `fullchain.pem` +
  `privkey.pem`.
- **bare registry**: the registry binary serving TLS itself with a fixed certificate from a
  local CA (no ACME).

**Authentication is off on every path of these comparisons** (our product with
`AUTH_MODE=none` and no `AUTH_USERS`; the registry behind Caddy and the bare registry without
`auth`), so all paths run with the same setting; comparison 9 measures with authentication
on, every mode side by side (the product's default is htpasswd). Every registry process is
the same binary with the same configuration apart from TLS (default log level, access log
on; ours adds two response headers). The registry's storage is one directory shared by all
paths in comparisons 3-5.

Pebble runs with `PEBBLE_VA_NOSLEEP=1` and its defaults otherwise (5 % `badNonce`, 50 %
authorization reuse), fresh for every round of comparisons 1-2 (not timed). Times are from
the spawn of the first process of a path to the first `200` on `GET /v2/` over TLS verified
against the Pebble root for `registry.test` (polled every 10 ms). Paths never run at the same
time in comparisons 1-2; in 3-5 they are all up, but only one is measured at a time, in
alternating order (A B C, then C B A). Caddy's renewals run on Pebble 2.10 with a single
profile of {validity}-second certificates (Caddy 2.6 sends no profile; Pebble then picks one
at random among those configured).
"""


def _goals(results: dict[str, Any]) -> str:
    rows = []
    if "data" in results:
        for proto, name in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
            s_ours, s_bare = speeds(results, "ours", proto), speeds(results, "bare", proto)
            share = med(s_ours) / med(s_bare)
            low, high = ratio_interval(s_ours, s_bare)
            rows.append(
                (
                    f"Data path throughput, {name}",
                    f">= {GOAL_THROUGHPUT} of bare",
                    f"{med(s_ours):.0f} vs {med(s_bare):.0f} MB/s = {share:.3f} "
                    f"(95 % interval {low:.2f}-{high:.2f})",
                    _noisy_verdict(share, low, high),
                )
            )
            c_ours, c_bare = cpu_per_gb(results, "ours", proto), cpu_per_gb(results, "bare", proto)
            eff = med(c_bare) / med(c_ours)
            low, high = ratio_interval(c_bare, c_ours)
            rows.append(
                (
                    f"Data path CPU, {name}",
                    f">= {GOAL_THROUGHPUT} of bare (bare CPU / ours)",
                    f"{med(c_ours):.3f} vs {med(c_bare):.3f} s/GB = {eff:.3f} "
                    f"(95 % interval {low:.2f}-{high:.2f})",
                    _noisy_verdict(eff, low, high),
                )
            )
    if "startup" in results:
        ours, caddy = (med(startup_values(results, k, "cold")) for k in ("ours", "caddy"))
        rows.append(
            (
                "Cold start",
                "ahead of Caddy in the same run",
                f"{ours:.3f} vs {caddy:.3f} s",
                _verdict(ours < caddy, f"{ours - caddy:.3f} s"),
            )
        )
        warm = med(startup_values(results, "ours", "warm"))
        rows.append(
            (
                "Start with a stored certificate",
                f"< {GOAL_WARM} s (Caddy here: "
                f"{med(startup_values(results, 'caddy', 'warm')):.3f} s)",
                f"{warm:.3f} s",
                _verdict(warm < GOAL_WARM, f"{warm - GOAL_WARM:.3f} s"),
            )
        )
    run = renewal_run(results, "ours", "renewal")
    if run:
        rows.append(
            (
                "Rotation under load",
                "zero failed requests",
                f"{run['failed']} failed of {run['requests']} in {run['events']} renewals "
                f"({run['refused']} refused connects, each retried once after 5 ms)",
                _verdict(run["failed"] == 0, f"{run['failed']} failed requests"),
            )
        )
    if "memory_idle" in results:
        idle_rss, idle_pss = added_memory(results, "ours")
        load_rss, load_pss = loaded_memory(results, "ours")
        renew_rss, renew_pss = renewing_memory(results, "ours")
        caddy_rss, caddy_pss = added_memory(results, "caddy")
        worst = max(idle_pss, load_pss, renew_pss)
        rows.append(
            (
                "Memory beside the registry",
                f"PSS < {GOAL_PSS_MIB} MiB (Caddy's RSS in the issue)",
                f"PSS {mib(idle_pss)} idle / {mib(load_pss)} under load / {mib(renew_pss)} "
                f"renewing MiB; RSS {mib(idle_rss)} / {mib(load_rss)} / {mib(renew_rss)} MiB "
                f"(Caddy idle here: PSS {mib(caddy_pss)}, RSS {mib(caddy_rss)})",
                _verdict(worst < GOAL_PSS_MIB * MIB, f"{(worst / MIB - GOAL_PSS_MIB):.1f} MiB"),
            )
        )
    if "port80" in results:
        ours = results["port80"]["variants"][0]
        top = max(ours["rows"], key=lambda row: row["count"])
        slowest = max(top["challenge"]["max"] or 99, top["redirect"]["max"] or 99)
        answered = top["challenge"]["answered"] + top["redirect"]["answered"]
        asked = top["challenge"]["requests"] + top["redirect"]["requests"]
        rows.append(
            (
                "Port 80 with idle connections held",
                "10,000 held: answers < 1 s, agent RSS < 128 MiB",
                f"{top['held_after']} held: {answered}/{asked} answered, slowest "
                f"{slowest * 1000:.1f} ms (first after the burst "
                f"{(top['first_after_burst'] or 0) * 1000:.0f} ms); RSS "
                f"{top['memory']['rss'] / MIB:.1f} MiB",
                _verdict(
                    answered == asked and slowest < 1 and top["memory"]["rss"] < 128 * MIB,
                    "see the table",
                ),
            )
        )
    for run in results.get("rotation_paths", []):
        if run["path"] == "socket activation":
            rows.append(
                (
                    f"Rotation refuses nothing ({run['version']})",
                    "0 refused connects",
                    f"{run['refused']} refused, {run['unanswered']} unanswered, "
                    f"{run['failed']} failed in {run['rotations']} renewals",
                    _verdict(run["refused"] == 0, f"{run['refused']} refused"),
                )
            )
    if "dns" in results:
        from bench import dns

        rows.append(dns.goal_row(results))
    for run in results.get("auth", []):
        rates = run["rates"]
        share = med(rates["token"]) / med(rates["none"])
        rows.append(
            (
                f"Token mode's manifest GET rate, auth on ({run['version']})",
                f">= {auth_rate.GOAL_TOKEN_SHARE} of no auth",
                f"{med(rates['token']):,.0f} vs {med(rates['none']):,.0f} requests/s = "
                f"{share:.2f} (htpasswd cost 10: "
                f"{med(rates['htpasswd cost 10']) / med(rates['none']):.3f})"
                + _cpu_share_note(run),
                auth_verdict(rates),
            )
        )
    for run in results.get("gc", []):
        during, without = run["during"], run["without"]
        rows.append(
            (
                f"Pulls during a collection ({run['version'].split()[-1]}, auth "
                f"{gc_collect.auth_label(run)})",
                "zero failed pulls",
                f"{len(run['failures'])} failed of {during['pulls']} during a "
                f"{run['gc_command_seconds']:.2f} s run ({run['readonly_seconds']:.2f} s "
                f"read-only); pull p99 {ms_of(during['p99'])} vs {ms_of(without['p99'])} ms "
                "without",
                _verdict(not run["failures"], f"{len(run['failures'])} failed pulls"),
            )
        )
    replicas = results.get("replicas", {})
    if replicas.get("cold_starts"):
        orders = [start["orders"] for start in replicas["cold_starts"]]
        rows.append(
            (
                f"Cold start of {replicas['replicas']} replicas at once",
                "exactly one order",
                ", ".join(map(str, orders)) + f" orders in {len(orders)} rounds",
                _verdict(all(n == 1 for n in orders), f"{max(orders) - 1} extra orders"),
            )
        )
    if replicas.get("renewal"):
        failed = replicas["renewal"]["failed"]
        rows.append(
            (
                "Renewals of the replicas, through haproxy",
                "zero failed requests",
                f"{failed} failed of {replicas['renewal']['requests']} in "
                f"{len(replicas['renewal']['renewals'])} renewals",
                _verdict(failed == 0, f"{failed} failed requests"),
            )
        )
    return table(("goal", "target", "this run", "verdict"), rows, "llll")


def _cpu_share_note(run: dict[str, Any]) -> str:
    """The same comparison in the registry's CPU per request, which other work on the
    machine moves far less than the rate (runs before it was recorded have none)."""
    cpu = run.get("server_cpu_us")
    if not cpu:
        return ""
    token, none = med(cpu["token"]), med(cpu["none"])
    return f"; CPU per request {token:,.0f} vs {none:,.0f} us = {none / token:.2f}"


def auth_verdict(rates: dict[str, list[float]]) -> str:
    """Token mode against its goal: met on the medians, or missed within this run's noise
    (the bootstrap interval of the ratio reaches the goal), or missed."""
    goal = auth_rate.GOAL_TOKEN_SHARE
    share = med(rates["token"]) / med(rates["none"])
    low, high = ratio_interval(rates["token"], rates["none"])
    if share >= goal:
        return f"met (95 % interval {low:.2f}-{high:.2f})"
    if high >= goal:
        return (
            f"missed on the medians by {goal - share:.2f}, within noise (95 % interval "
            f"{low:.2f}-{high:.2f})"
        )
    return f"**missed** by {goal - share:.2f} (95 % interval {low:.2f}-{high:.2f})"


def _one_line(error: str) -> str:
    """An error message for a table or a sentence: one line, without certbot's boilerplate."""
    text = " ".join(line.strip() for line in error.splitlines() if line.strip())
    text = re.sub(r"Saving debug log to \S+\s*", "", text)
    return re.sub(r"Ask for help or search for solutions at .*?more details\.\s*", "", text).strip()


def _verdict(met: bool, by: str) -> str:
    return "met" if met else f"**missed** by {by}"


def _noisy_verdict(value: float, low: float, high: float) -> str:
    """Met on the medians; missed only if even the interval's top is below the goal."""
    if value >= GOAL_THROUGHPUT:
        return "met"
    by = f"{(GOAL_THROUGHPUT - value) * 100:.1f} points"
    if high >= GOAL_THROUGHPUT:
        return f"missed on the medians by {by}, within noise (the interval reaches {high:.2f})"
    return f"**missed** by {by}"


def _startup(results: dict[str, Any], charts: dict[str, Path]) -> str:
    s = results["startup"]
    ours_cold = med(startup_values(results, "ours", "cold"))
    ours_warm = med(startup_values(results, "ours", "warm"))
    ref_cold = {"caddy": REFERENCE["caddy_cold"], "certbot": REFERENCE["certbot_issue"]}
    ref_warm = {"caddy": REFERENCE["caddy_warm"]}
    rows = []
    for key in ("ours", "caddy", "certbot"):
        cold = startup_values(results, key, "cold")
        warm = startup_values(results, key, "warm")
        issue = startup_values(results, key, "issue")
        if key == "ours":
            issue = [b.get("issuance (metric)") for b in s["paths"]["ours"].get("breakdown", [])]
            issue = [v for v in issue if v is not None]
        rows.append(
            (
                LABELS[key],
                spread(cold, sec),
                ratio(med(cold), ours_cold),
                spread(issue, sec),
                spread(warm, sec),
                ratio(med(warm), ours_warm),
                " / ".join(f"{r[key]} s" if key in r else "-" for r in (ref_cold, ref_warm)),
            )
        )
    text = [
        f"{s['rounds']} rounds, medians (min-max). The certbot row's cold start is certbot's "
        "run plus the registry's start; its stored-certificate start is the registry alone. "
        "Issuance: ours from the agent's `acme_registry_issuance_duration_seconds`, Caddy "
        "from its log (`obtaining certificate` to `certificate obtained successfully`), "
        "certbot its whole run.",
        "",
        table(
            (
                "path",
                "cold start",
                "x ours",
                "issuance",
                "stored certificate",
                "x ours",
                "issue's reference (cold / stored)",
            ),
            rows,
        ),
    ]
    fields = (("breakdown", "cold start"), ("warm_breakdown", "stored certificate"))
    all_marks = [m for f, _ in fields for m in s["paths"]["ours"].get(f, [])]
    keys = [k for k in MARKS if any(k in m for m in all_marks)]
    breakdown_rows = []
    for field, name in fields:
        marks = s["paths"]["ours"].get(field, [])
        if marks:
            cells = [spread([m[k] for m in marks if k in m], sec) for k in keys]
            breakdown_rows.append((name, *cells))
    if breakdown_rows:
        text += [
            "",
            "Where ours spends a start (seconds after `acme-registry run` was spawned, from "
            "supervisord's and the registry's log timestamps; medians and min-max):",
            "",
            table(("start", *keys), breakdown_rows),
        ]
    if s["errors"]:
        text += ["", "Failed rounds (not counted): " + "; ".join(map(_one_line, s["errors"]))]
        if any("can't set attribute" in e for e in s["errors"]):
            text += [
                "",
                "certbot's `AttributeError: can't set attribute`: certbot 2.1 retries a "
                "`badNonce` once, and a second one in a row (Pebble rejects 5 % of nonces) "
                "ends in its known crash on Python 3.11 when reporting an ACME error (certbot "
                "issue #9539; checked here: with Pebble rejecting 60 % of nonces every certbot "
                "run ends this way, its log showing the `badNonce`).",
            ]
    if "startup" in charts:
        text += ["", f"![start-up times]({charts['startup'].name})"]
    return "\n".join(text)


def _data(results: dict[str, Any], charts: dict[str, Path]) -> str:
    d = results["data"]
    rows = []
    for key in ("ours", "caddy", "bare"):
        cells = [LABELS[key]]
        for proto in ("h1", "h2"):
            values = speeds(results, key, proto)
            versions = sorted({s["version"] for s in d["get"][key][proto]})
            cells.append(spread(values, lambda v: f"{v:.0f}") + f" (HTTP/{'/'.join(versions)})")
            cells.append(ratio(med(values), med(speeds(results, "bare", proto))))
        for proto in ("h1", "h2"):
            values = cpu_per_gb(results, key, proto)
            cells.append(spread(values, lambda v: f"{v:.3f}"))
            cells.append(ratio(med(values), med(cpu_per_gb(results, "bare", proto))))
        rows.append(cells)
    size_mb = d["blob_bytes"] / 2**20
    text = [
        f"One {size_mb:.0f} MiB blob of random data, uploaded once (monolithic `POST` + `PUT "
        f"?digest=`) into the shared storage, then fetched {d['rounds']} times per path and "
        "protocol with `curl --http1.1` / `--http2 -o /dev/null -w '%{speed_download}'` "
        "(`--cacert` the path's root, `--resolve registry.test:PORT:127.0.0.1`), after one "
        "untimed GET per path (page cache warm). Server CPU is utime+stime from "
        "`/proc/<pid>/stat` of every process of the path, before and after each GET: ours = "
        "the registry + supervisord (the `run` process) + the agent; Caddy = caddy + the "
        "registry; bare = the registry.",
        "",
        table(
            (
                "path",
                "HTTP/1.1 MB/s",
                "x bare",
                "HTTP/2 MB/s",
                "x bare",
                "CPU s/GB, HTTP/1.1",
                "x bare",
                "CPU s/GB, HTTP/2",
                "x bare",
            ),
            rows,
        ),
    ]
    split_rows = []
    for proto, name in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        split_rows.append(
            (
                name,
                f"{med(cpu_per_gb(results, 'ours', proto, 'registry')):.3f}",
                f"{med(cpu_per_gb(results, 'ours', proto, 'added')):.4f}",
                f"{med(cpu_per_gb(results, 'caddy', proto, 'registry')):.3f}",
                f"{med(cpu_per_gb(results, 'caddy', proto, 'added')):.3f}",
            )
        )
    text += [
        "",
        "CPU split (s/GB, medians): what the registry itself uses, and what sits beside it.",
        "",
        table(
            (
                "protocol",
                "ours: registry",
                "ours: supervisord + agent",
                "Caddy path: registry",
                "Caddy path: caddy",
            ),
            split_rows,
        ),
    ]
    ref = REFERENCE
    caddy_h1, bare_h1 = med(speeds(results, "caddy", "h1")), med(speeds(results, "bare", "h1"))
    pull_gb = d["blob_bytes"] / GB
    caddy_cpu = med(cpu_per_gb(results, "caddy", "h1")) * pull_gb
    bare_cpu = med(cpu_per_gb(results, "bare", "h1")) * pull_gb
    text += [
        "",
        f"The issue's reference (HTTP/1.1): Caddy {ref['caddy_h1_mbs']} MB/s against "
        f"{ref['bare_h1_mbs']} MB/s bare ({ref['caddy_h1_mbs'] / ref['bare_h1_mbs']:.2f}); "
        f"server CPU {ref['caddy_cpu']} s against {ref['bare_cpu']} s for the same pull "
        f"({ref['caddy_cpu'] / ref['bare_cpu']:.2f}x). This run: Caddy {caddy_h1:.0f} MB/s "
        f"against {bare_h1:.0f} MB/s ({caddy_h1 / bare_h1:.2f}); {caddy_cpu:.2f} s against "
        f"{bare_cpu:.2f} s per {size_mb:.0f} MiB pull ({caddy_cpu / bare_cpu:.2f}x).",
    ]
    srows = []
    for key in ("ours", "caddy", "bare"):
        sk = d["skopeo"][key]
        srows.append((LABELS[key], spread(sk["push"], sec), spread(sk["pull"], sec)))
    text += [
        "",
        f"skopeo ({results['machine']['versions'].get('skopeo', '?')}, verified TLS, in a "
        "mount namespace whose /etc/hosts maps "
        f"`registry.test` to loopback) pushing and pulling a one-layer image of "
        f"{d['skopeo_mb']} MiB random data, a fresh image every time, {d['skopeo_rounds']} "
        "rounds (whole `skopeo copy` runs, process start included):",
        "",
        table(("path", "push", "pull"), srows),
    ]
    if d["errors"]:
        text += ["", "Errors: " + "; ".join(d["errors"])]
    if "data" in charts:
        text += ["", f"![data path]({charts['data'].name})"]
    return "\n".join(text)


def _renewal(results: dict[str, Any], charts: dict[str, Path]) -> str:
    r = results["renewal"]
    rows = []
    for run in r["runs"]:
        rows.append(
            (
                run["label"],
                f"{run['duration']:.0f} s",
                str(run["requests"]),
                f"**{run['failed']}**",
                str(run["refused"]),
                str(run.get("unanswered", "-")),
                ms(run["p50"]),
                ms(run["p99"]),
                ms(run["p99_windows"]),
                ms(run["gap_max"]),
                ms(run["gap_windows"]),
                ms(run["blob_p99"]),
            )
        )
    text = [
        "Steady load from `tests.support.load.LoadClient` in its own process: 2 threads making "
        "a new TLS connection per manifest GET, 1 thread of keep-alive manifest GETs, 1 thread "
        "downloading the 4 MB layer (digest checked), 2 ms pause between requests. A refused "
        "connect is counted as *refused*, a connection accepted and then closed or reset before "
        "any response byte as *unanswered*; either is retried once after 5 ms; "
        "*failed* is a request that still failed, or got a wrong status or digest. A renewal's "
        "window runs from its start to 0.1 s after it ended (ours: the `acme-registry renew` "
        "command, order + rotation; Caddy: `attempting certificate renewal` to `replaced "
        "certificate in cache` in its log).",
        "",
        table(
            (
                "run",
                "length",
                "requests",
                "failed",
                "refused",
                "unanswered",
                "p50 ms",
                "p99 ms",
                "p99 in renewals ms",
                "longest connect gap ms",
                "gap in renewals ms",
                "blob p99 ms",
            ),
            rows,
        ),
    ]
    ours = renewal_run(results, "ours", "renewal")
    if ours and ours.get("renew_seconds"):
        rot = ours.get("rotation_ms", [])
        parts = [
            f"Ours: `acme-registry renew` took {spread(ours['renew_seconds'], sec)} "
            "(CLI start, order against Pebble, rotation)."
        ]
        if rot:
            parts.append(
                "Rotation (agent's log, medians): next generation ready "
                f"{med([x['ready'] for x in rot]):.1f} ms, stop request "
                f"{med([x['stop'] for x in rot]):.1f} ms, old listener gone "
                f"{med([x['gone'] for x in rot]):.1f} ms later, config handed over "
                f"{med([x['handed'] for x in rot]):.1f} ms later."
            )
        text += ["", " ".join(parts)]
    caddy = renewal_run(results, "caddy", "renewal")
    if caddy and caddy.get("renewal_seconds"):
        text += [
            "",
            f"Caddy renewed {caddy['events']} times during its run, each "
            f"{spread(caddy['renewal_seconds'], sec)} from attempt to the new certificate "
            "in its cache; the listener never changes.",
        ]
    if r.get("errors"):
        text += ["", "Errors: " + "; ".join(r["errors"])]
    for run in r["runs"]:
        if run["failures"] or run["notes"]:
            text += ["", f"{run['label']}: " + "; ".join(run["failures"] + run["notes"])]
    cpu_rows = []
    for run in r["runs"]:
        if run["kind"] != "baseline":
            continue  # processes come and go during renewals: /proc deltas would miss some
        per_k = 1000 / run["requests"] if run["requests"] else 0
        cpu_rows.append(
            (
                run["label"],
                f"{run['cpu'].get('registry', 0):.2f}",
                f"{run['cpu'].get('added', 0):.2f}",
                f"{run['cpu'].get('registry', 0) * per_k:.3f}",
                f"{run['cpu'].get('added', 0) * per_k:.3f}",
            )
        )
    text += [
        "",
        "Server CPU seconds during the runs without renewal (ours, beside the registry: "
        "supervisord, which also relays the registry's access log, and the agent; Caddy's "
        "path: the proxy):",
        "",
        table(
            (
                "run",
                "registry s",
                "beside it s",
                "registry s / 1000 requests",
                "beside it s / 1000 requests",
            ),
            cpu_rows,
        ),
    ]
    if "renewal" in charts:
        text += ["", f"![renewal under load]({charts['renewal'].name})"]
    return "\n".join(text)


def _memory(results: dict[str, Any], charts: dict[str, Path]) -> str:
    rows = []
    for key in ("ours", "caddy"):
        idle = added_memory(results, key)
        load = loaded_memory(results, key)
        after = added_memory(results, key, "memory_after")
        renewing = renewing_memory(results, key)
        rows.append(
            (
                "acme-registry: everything beside the registry" if key == "ours" else "Caddy",
                mib(idle[0]),
                mib(idle[1]),
                mib(load[0]),
                mib(load[1]),
                mib(renewing[0]) if renewing[0] else "-",
                mib(renewing[1]) if renewing[1] else "-",
                mib(after[0]) if after[0] else "-",
                mib(after[1]) if after[1] else "-",
            )
        )
    for key in ("ours", "caddy", "bare"):
        group = results["memory_idle"].get(key, {}).get("registry")
        if group:
            rows.append(
                (
                    f"(registry process of the {LABELS[key]} path)",
                    mib(group["rss"]),
                    mib(group["pss"]),
                    *[""] * 6,
                )
            )
    text = [
        "From `/proc/<pid>/smaps_rollup`, in MiB, summed over every process of the group. "
        "Idle: all paths up, no requests. Under load: the peak of samples every 0.5 s during "
        "the no-renewal load run. Renewing: for ours the peak of samples every 20 ms while "
        "`acme-registry renew` runs (3 times, no load; any child doing the order counts), for "
        "Caddy the peak during its renewal run (that second Caddy shares its binary's pages "
        "with the first one, still running, which lowers both PSS figures while it runs). "
        "After: idle again, after the renewal runs.",
        "",
        table(
            (
                "what",
                "idle RSS",
                "idle PSS",
                "load RSS (peak)",
                "load PSS (peak)",
                "renewing RSS (peak)",
                "renewing PSS (peak)",
                "after RSS",
                "after PSS",
            ),
            rows,
        ),
        "",
        "Per process at idle (USS: pages private to the process, the least it costs; RSS: "
        "everything it maps, the most):",
        "",
        table(
            ("process", "RSS", "PSS", "USS (private)"),
            [
                (f"`{p['name']}`", mib(p["rss"]), mib(p["pss"]), mib(p.get("uss", 0)))
                for key in ("ours", "caddy")
                for p in results["memory_idle"][key]["added"]["processes"]
            ],
        ),
    ]
    during = results.get("renewal", {}).get("memory_during_renewal")
    if during:
        text += [
            "",
            "Ours at its peak while renewing (`acme-registry renew` took "
            f"{spread(during['renew_seconds'], sec)} there):",
            "",
            table(
                ("process", "RSS", "PSS", "USS (private)"),
                [
                    (f"`{p['name']}`", mib(p["rss"]), mib(p["pss"]), mib(p["uss"]))
                    for p in during["processes_at_peak"]
                    if isinstance(p, dict)
                ],
            ),
        ]
    image = results["machine"].get("image")
    if image:
        text += [
            "",
            f"Image: `{image['name']}` is {image['bytes'] / 1e6:.0f} MB (`podman images`: the "
            "newest image named `acme-registry` on this machine, built by the e2e tests or by "
            "hand; the benchmark itself runs no container). Caddy's Debian package installs a "
            f"{results['machine'].get('caddy_binary_mb', 0):.0f} MB static binary.",
        ]
    else:
        text += ["", "Image size: no image built on this machine (`podman images`)."]
    if "memory" in charts:
        text += ["", f"![memory]({charts['memory'].name})"]
    return "\n".join(text)


def _port80(results: dict[str, Any], charts: dict[str, Path]) -> str:
    return "\n".join(
        [
            "Idle connections that sent half a request line are held open against the "
            "product's port 80 (`bench/port80.py`, one client process, no bandwidth), then "
            "challenge GETs (200) and plain GETs (301) are timed; the agent's memory is every "
            "process of `acme-registry run` but the registry. The base commit's "
            "thread-per-connection responder (capped at 256 connections) runs the same "
            "scenario beside it as today's baseline. The agent runs with AUTH_MODE=none "
            "(authentication plays no part on port 80; the default, htpasswd, was not run "
            "beside it).",
            "",
            port80.table(results["port80"]),
        ]
    )


def _paths(results: dict[str, Any], charts: dict[str, Path]) -> str:
    rows = [
        (
            run["path"],
            run["version"],
            str(run["rotations"]),
            str(run["requests"]),
            str(run["refused"]),
            str(run["unanswered"]),
            str(run["failed"]),
        )
        for run in results["rotation_paths"]
    ]
    header = ("path", "registry", "renewals", "requests", "refused", "unanswered", "failed")
    return "\n".join(
        [
            "`acme-registry renew` with AUTH_MODE=none (not the default: with htpasswd every "
            "request costs a bcrypt check, which would cap the loops; no htpasswd twin was run) "
            "under 4 tight client loops (a new TLS connection per "
            "manifest GET, no pause; `bench.rotation.path_bench`). *Refused*: connects "
            "refused; *unanswered*: connections accepted, then closed with no response byte; "
            "each retried once after 5 ms; *failed*: still failed after that retry. The FIFO "
            "path is today's (and still 2.x's); socket activation is what the image's default "
            "`registry:3` takes (here measured on the 3.x stand-in, "
            "`tests/support/standin_registry.py`, unless a real 3.x binary was given with "
            "`--rotation-binary`).",
            "",
            table(header, rows, "llrrrrr"),
        ]
    )


def _auth(results: dict[str, Any], charts: dict[str, Path]) -> str:
    runs = results["auth"]
    first = runs[0]
    text = [
        "Authentication on: every mode serves one registry storage side by side "
        "(`bench/auth_rate.py`, `bench/auth_pull.py`). *none*, *htpasswd cost 10* and "
        "*htpasswd cost 4*: the registry binary serving TLS itself with the same "
        "configuration apart from `auth` (an htpasswd file of one user). *token*: the "
        "registry's `auth.token` trusting our token service's signing certificate, the token "
        "service running as the agent runs it (its own event loop, the same certificate), the "
        "user's password hashed at cost 10 (a chosen password). *Caddy basic_auth*: Caddy "
        "(TLS, `basicauth` with a cost-10 bcrypt hash of the same password, as for our "
        "default, then `reverse_proxy` to the registry on plain HTTP), configured as Caddy "
        "2.6's Caddyfile adapter writes `basicauth { bench <hash> }`, which includes "
        "`hash_cache`: a successful comparison is remembered per password and hash, so only a "
        "client's first request runs bcrypt. *Caddy basic_auth, no cache*: the same without "
        "`hash_cache` (JSON config only), one bcrypt per request as the registry does. "
        "(Caddy 2.6 spells the directive `basicauth`; later releases call it `basic_auth`.)",
        "",
        f"Rate: {first['connections']} curl clients, each one keep-alive HTTPS connection "
        "sending `GET /v2/bench/app/manifests/v1` (a 4 KiB image) as fast as it is answered, "
        f"{first['seconds']:.0f} s per mode and round, the modes one after the other (in "
        "alternating order: A B C ..., then ... C B A); every "
        "answer must be 200. Token mode sends one token fetched beforehand (the registry "
        "checks its ES256 signature per request; the token names its key as the agent's do "
        "for that binary: `kid` for 3.x, a lookup among the bundle's keys, `x5c` for 2.8, a "
        "certificate verified per request). docker pull: the real Docker engine "
        "(20.10, dockerd of the bench's own, host network, the local CA trusted through its "
        "`certs.d`), `docker login` once per authenticated path (token mode: docker keeps the "
        f"token service's refresh token), then `docker pull` of a {first['layers']}-layer "
        f"image ({first['layers']} x {first['layer_bytes'] // 1024} KiB random layers), "
        "removed before every pull so each downloads and extracts every layer again "
        "(14 registry requests, counted in the access log; the vfs storage driver's "
        "copies are part of the time), "
        "the modes in alternating order. The clients share the machine with the "
        "servers: compare the ratios of one run, not absolute rates across machines.",
    ]
    if first.get("pinning"):
        text += [
            "",
            f"Pinned ({first['pinning']}, every mode alike; `bench.auth_rate.Pinning`): the "
            "curl clients cost CPU too (the *client CPU* column), and on shared cores they take "
            "it from the server being measured, so the rate ratio would partly measure how the "
            "kernel shares the cores. Other work on the machine still runs on every core. "
            "*Server CPU* is the CPU time the serving processes used per answered request "
            "(`/proc`; Caddy's rows: Caddy and its registry together): it depends far less on "
            "that other work than the rate, and *no auth's CPU / this* is the rate a mode "
            "would reach, relative to no auth, on a core of its own.",
        ]
    load, cores = results["machine"]["load_before"], results["machine"]["nproc"]
    # The load after the run counts the benchmark's own clients and servers; before, others'.
    if load > cores:
        text += [
            "",
            f"**A busy machine**: the load average was {load:.1f} before this run on {cores} "
            "cores, so other work took CPU from servers and clients alike: treat single "
            "ratios with care and look at the spread of the rounds.",
        ]
    for run in runs:
        rates, pulls = run["rates"], run["pulls"]
        cpu, client = run.get("server_cpu_us"), run.get("client_cpu_us")
        base_rate, base_pull = med(rates["none"]), med(pulls["none"])
        rows = []
        for mode in auth_rate.MODES:
            row: tuple[str, ...] = (
                mode,
                f"{med(rates[mode]):,.0f}",
                ", ".join(f"{r:,.0f}" for r in rates[mode]),
                f"{med(rates[mode]) / base_rate:.3f}",
            )
            if cpu and client:
                row += (
                    f"{med(cpu[mode]):,.0f}",
                    f"{med(cpu['none']) / med(cpu[mode]):.3f}",
                    f"{med(client[mode]):,.0f}",
                )
            pull = spread(pulls[mode], lambda v: f"{v:.2f} s")
            rows.append((*row, pull, f"{med(pulls[mode]) / base_pull:.2f}"))
        head: tuple[str, ...] = ("auth", "manifest GET/s (median)", "rounds", "vs no auth")
        if cpu and client:
            head += (
                "server CPU us/request (median)",
                "no auth's CPU / this",
                "client CPU us/request",
            )
        head += ("docker pull (median, min-max)", "pull time vs no auth")
        text += [
            "",
            f"**{run['version']}** (`{run['binary']}`):",
            "",
            table(head, rows, "l" + "r" * (len(head) - 1)),
        ]
    return "\n".join(text)


def _dns(results: dict[str, Any], charts: dict[str, Path]) -> str:
    from bench import dns  # it renders with this module's helpers

    return dns.section(results)


def _gc(results: dict[str, Any], charts: dict[str, Path]) -> str:
    runs = results["gc"]
    first = runs[0] if runs else {}
    return "\n".join(
        [
            "`acme-registry run` (`RETENTION_KEEP_LAST=5`, no schedule; for each binary the "
            "default authentication, htpasswd with one user whose chosen password is hashed "
            "at bcrypt cost 10, and AUTH_MODE=none beside it) with "
            f"a CI-like history pushed by skopeo: {first.get('tags', '?')} tags of 10 shared "
            f"and 50 own 2 KiB layers each ({first.get('blobs_before', '?')} blobs), then "
            "`acme-registry gc` "
            "(`bench/gc_collect.py`, `agent_run`). *`gc` command*: the whole run as the CLI "
            "waits for it (plan, retention's API deletes, the read-only window); *read-only "
            "window*: from the switch to a read-only generation to the end of the switch back "
            "(both generation switches, counting the unreferenced blobs, garbage-collect); "
            "*garbage-collect*: the registry's own command. One client pulls a kept image "
            "(a manifest GET and a 256 KiB blob GET on one keep-alive session; a refused "
            "connect, or a GET on a kept-alive connection that the draining generation closed "
            "with no response byte, retried once after 50 ms: Go's and docker's clients retry "
            "such a GET by themselves) for 10 s without a collection, then during the whole "
            "`gc` command; latency per pull. The machine's other work (the load average "
            "above) was not stopped for it: the times are this run's, not a floor.",
            "",
            gc_collect.table(runs),
        ]
    )


def _replica_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    memory = result.get("memory", {})
    if "file" in memory and "s3" in memory:
        file_rss, s3_rss = memory["file"]["rss"], memory["s3"]["rss"]
        rows.append(
            (
                "agent memory, one instance idle (RSS / PSS)",
                f"file {mib(file_rss)} / {mib(memory['file']['pss'])} MiB; "
                f"s3 {mib(s3_rss)} / {mib(memory['s3']['pss'])} MiB "
                f"(s3 = {s3_rss / file_rss:.2f} x file, +{mib(s3_rss - file_rss)} MiB RSS)",
            )
        )
    starts = result.get("cold_starts", [])
    if starts:
        rows.append(
            (
                f"orders on a cold start of {result['replicas']} replicas at once",
                ", ".join(str(s["orders"]) for s in starts)
                + f" ({len(starts)} rounds; serials served: "
                + ", ".join(str(s["serials"]) for s in starts)
                + "; all ready after "
                + ", ".join(f"{s['ready_seconds']:.1f}" for s in starts)
                + " s)",
            )
        )
    renewal = result.get("renewal")
    if renewal:
        lasts = [max(r["follow_seconds"]) for r in renewal["renewals"]]
        rows.append(
            (
                "renewal committed to last replica serving it",
                f"longest {max(lasts):.2f} s, median {statistics.median(lasts):.2f} s "
                f"over {len(lasts)} renewals (record poll {result['poll_interval']:g} s)",
            )
        )
        rows.append(
            (
                "requests through haproxy during the renewals",
                f"{renewal['failed']} failed of {renewal['requests']} "
                f"({renewal['refused']} refused connects, {renewal['unanswered']} unanswered, "
                "each retried once after 5 ms)",
            )
        )
    idle = result.get("idle")
    if idle:
        rows.append(
            (
                f"S3 requests at idle, {idle['replicas']} replicas",
                f"{idle['per_minute']:.1f} per minute "
                f"({idle['per_minute'] / idle['replicas']:.1f} per replica; "
                f"{idle['requests']} in {idle['seconds']:g} s)",
            )
        )
    return rows


def _replicas(results: dict[str, Any], charts: dict[str, Path]) -> str:
    return "\n".join(
        [
            f"{results['replicas']['replicas']} replicas of `acme-registry run` (registry "
            "2.8.2, htpasswd users) behind haproxy in TCP mode (round-robin over their 80 and "
            "443), the images and `STATE_STORE=s3` in one SeaweedFS bucket, Pebble 2.10 "
            "validating through haproxy's port 80 with no authorization reuse and its 0-4 s "
            "validation sleep on (`bench/replicas.py`; `STATE_POLL_INTERVAL` and "
            "`STATE_LOCK_LEASE` at their defaults). Renewals are `acme-registry renew` on "
            "each replica in turn, under manifest GETs through haproxy (one worker per "
            "mode, authenticated: each request costs a bcrypt check, which keeps the rate "
            "low); the follow time runs from the commit (the shared certificate record "
            "changing, watched with HEAD every 20 ms) until the last replica serves the new "
            "certificate on its own port. S3 requests are counted by the S3 server.",
            "",
            table(("measure", "this run"), _replica_rows(results["replicas"]), "ll"),
        ]
    )


def render(results: dict[str, Any], charts: dict[str, Path]) -> str:
    parts = [
        "# Benchmarks: acme-registry against Caddy, certbot and the bare registry",
        "",
        "Written by `make bench` (the harness in [`bench/`](../bench/), issue 6). Everything "
        "runs on loopback on one machine; the numbers below are from the run described here. "
        "Regenerate, do not edit: `make bench` rewrites this file and the charts.",
        "",
        "## Machine, versions, command",
        "",
        _machine(results),
        "",
        *(
            ["## What runs", "", _setup_text(results)]
            # It describes comparisons 1-5; the other parts say what they run themselves.
            if any(k in results for k in ("startup", "data", "renewal", "memory_idle"))
            else []
        ),
        "## Goals",
        "",
        _goals(results),
    ]
    sections: list[tuple[str, str, Callable[[dict[str, Any], dict[str, Path]], str]]] = [
        ("startup", "1-2. Start-up: cold, and with a stored certificate", _startup),
        ("data", "3. Data path: blob GET, CPU, skopeo", _data),
        ("renewal", "4. Renewal under load", _renewal),
        ("memory_idle", "5. Memory and image", _memory),
        ("port80", "6. Port 80 under idle connections", _port80),
        ("rotation_paths", "7. Rotation paths: FIFO (2.x) and socket activation (3.x)", _paths),
        ("dns", "8. DNS validation: dns-01 against http-01 and certbot's RFC 2136 plugin", _dns),
        ("auth", "9. Authentication on: manifest GET rate and docker pull", _auth),
        ("gc", "10. Retention and garbage collection", _gc),
        ("replicas", "11. Several replicas behind one load balancer", _replicas),
    ]
    for key, title, section in sections:
        if key in results:
            parts += ["", f"## {title}", "", section(results, charts)]
    if results.get("errors"):
        parts += ["", "## Parts that failed in this run", ""]
        parts += [f"- {error}" for error in results["errors"]]
    parts += ["", "## Closing note", "", notes.closing(results), ""]
    return "\n".join(parts)


def write(results: dict[str, Any], out: Path, chart_dir: Path) -> list[Path]:
    charts = _charts(results, chart_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, charts))
    return [out, *charts.values()]
