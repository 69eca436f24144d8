"""How long retention and a collection take, and what pulls see meanwhile (issue 13).

Pushes a CI-like history with skopeo (each tag: a few layers shared by all, the rest its
own), then applies ``RETENTION_KEEP_LAST`` and collects. Two forms:

- ``python -m bench.gc_collect``: ``acme_registry.gc`` against the registry binary alone; the
  read-only window is two plain restarts (stop, start read-only; stop, start read-write), an
  upper bound of the product's.
- ``python -m bench.gc_collect --agent`` and ``python -m bench --only gc``: the product,
  ``acme-registry run`` against Pebble and ``acme-registry gc``, with one client pulling a
  kept image in a loop (its manifest and its one layer on one keep-alive session,
  ``tests.support.pull_loop``): pull latency for as long without a collection, then during
  the whole ``gc`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from acme_registry import gc
from acme_registry.gcconfig import RetentionRules
from acme_registry.registrytree import FilesystemTree, take_snapshot
from tests.support.clients import Skopeo, registry_session
from tests.support.oci_layers import add_image
from tests.support.ports import free_port
from tests.support.pull_loop import PullLoop
from tests.support.registry_process import RegistryProcess

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
PULL_REPO, PULL_TAG = "bench/pulled", "latest"


def push_history(
    skopeo: Skopeo,
    host: str,
    storage_root: Path,
    layout: Path,
    *,
    tags: int,
    shared_layers: int,
    own_layers: int,
    layer_bytes: int,
) -> float:
    """``tags`` tags of bench/app a minute apart (link mtimes); seconds the pushes took."""
    shared = [(f"s{i}", os.urandom(layer_bytes)) for i in range(shared_layers)]
    start = time.monotonic()
    for n in range(tags):
        own = [(f"o{i}", os.urandom(layer_bytes)) for i in range(own_layers)]
        add_image(layout, f"b{n}", shared + own)
        skopeo.push(layout, f"b{n}", f"{host}/bench/app:b{n}")
        link = storage_root / f"docker/registry/v2/repositories/bench/app/_manifests/tags/b{n}"
        stamp = (T0 + dt.timedelta(minutes=n)).timestamp()
        os.utime(link / "current/link", (stamp, stamp))
    return time.monotonic() - start


def blob_count(storage_root: Path) -> int:
    return len(take_snapshot(FilesystemTree(storage_root)).blob_sizes)


def latency(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"pulls": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "pulls": len(ordered),
        "p50": statistics.median(ordered),
        "p99": p99,
        "max": ordered[-1],
    }


@contextlib.contextmanager
def _product(
    workdir: Path, binary: Path, keep_last: int, auth: bool
) -> Iterator[tuple[Any, bytes]]:
    """`acme-registry run` (RETENTION_KEEP_LAST, no schedule) on Pebble; ``auth``: the
    default htpasswd mode with one user of a chosen password (bcrypt cost 10), else
    AUTH_MODE=none."""
    from tests.support.agent import served, start_agent
    from tests.support.pebble import Pebble

    pebble = Pebble(workdir / "pebble", free_port(), nonce_reject=0).start()
    try:
        agent = start_agent(
            workdir,
            pebble,
            binary,
            auth=auth,
            RETENTION_KEEP_LAST=str(keep_last),
            RETENTION_PROTECT=PULL_TAG,
            GC_SCHEDULE="off",
        )
        try:
            served(agent, pebble)
            agent.wait_ready()
            yield agent, pebble.root_pem()
        finally:
            agent.stop()
    finally:
        pebble.stop()


def agent_run(
    workdir: Path,
    binary: Path,
    *,
    tags: int = 40,
    shared_layers: int = 10,
    own_layers: int = 50,
    layer_bytes: int = 2048,
    keep_last: int = 5,
    baseline_seconds: float = 10.0,
    auth: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The product's collection of a few thousand blobs, with pulls before and during it;
    ``auth`` as operators run it by default (htpasswd), else AUTH_MODE=none."""
    from tests.support.agent import CREDS, NAME, PASSWORD, USER

    with _product(workdir, binary, keep_last, auth) as (agent, root):
        host = f"{NAME}:{agent.registry_port}"
        storage = Path(agent.env["REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"])
        skopeo = Skopeo(workdir / "skopeo", root, [NAME], creds=CREDS if auth else None)
        layout = workdir / "layout"
        pushed = push_history(
            skopeo,
            host,
            storage,
            layout,
            tags=tags,
            shared_layers=shared_layers,
            own_layers=own_layers,
            layer_bytes=layer_bytes,
        )
        add_image(layout, PULL_TAG, [("pulled", os.urandom(256 * 1024))])
        skopeo.push(layout, PULL_TAG, f"{host}/{PULL_REPO}:{PULL_TAG}")
        blobs_before = blob_count(storage)
        log(f"gc ({binary}): pushed {tags} tags, {blobs_before} blobs in {pushed:.1f} s")

        session = registry_session(NAME, root, workdir / "session")
        if auth:
            session.auth = (USER, PASSWORD)
        base = f"https://127.0.0.1:{agent.registry_port}"
        with PullLoop(session, base, f"{PULL_REPO}:{PULL_TAG}", retry_unanswered=True) as pulls:
            time.sleep(1)  # connection up, caches warm
            quiet_start = time.monotonic()
            time.sleep(baseline_seconds)
            gc_start = time.monotonic()
            result = agent.cli("gc", timeout=3600)
            gc_end = time.monotonic()
            time.sleep(1)
        if result.returncode != 0:
            raise RuntimeError(f"acme-registry gc failed: {result.stderr.strip()}")
        last = json.loads(agent.cli("status", "--json").stdout)["gc"]["last_run"]
        return {
            "binary": str(binary),
            "version": gc.registry_version(binary),
            "auth": "htpasswd" if auth else "none",
            "tags": tags,
            "blobs_before": blobs_before,
            "blobs_after": blob_count(storage),
            "push_seconds": pushed,
            "gc_command_seconds": gc_end - gc_start,
            "readonly_seconds": last["readonly_seconds"],
            "collect_seconds": last["collect_seconds"],
            "tags_removed": last["tags_removed"],
            "freed_bytes": last["freed_bytes"],
            "without": latency(pulls.between(quiet_start, gc_start)),
            "during": latency(pulls.between(gc_start, gc_end)),
            "failures": pulls.failures,
            "refused_retried": pulls.retries,
            "unanswered_retried": pulls.unanswered,
        }


def auth_label(run: dict[str, Any]) -> str:
    # Runs recorded before the auth twin were all AUTH_MODE=none.
    return "htpasswd (default)" if run.get("auth", "none") == "htpasswd" else "none"


def table(runs: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of agent runs: the collection, then pulls without and during it."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    header = (
        "registry",
        "auth",
        "blobs before → after",
        "tags removed",
        "`gc` command (s)",
        "read-only window (s)",
        "garbage-collect (s)",
        "pulls without / during",
        "p50 ms without / during",
        "p99 ms without / during",
        "max ms without / during",
        "failed pulls",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + " :--- |" * 2 + " ---: |" * 10]
    for run in runs:
        w, d = run["without"], run["during"]
        cells = (
            run["version"].split()[-1],
            auth_label(run),
            f"{run['blobs_before']} → {run['blobs_after']}",
            str(run["tags_removed"]),
            f"{run['gc_command_seconds']:.2f}",
            f"{run['readonly_seconds']:.2f}",
            f"{run['collect_seconds']:.2f}",
            f"{w['pulls']} / {d['pulls']}",
            f"{ms(w['p50'])} / {ms(d['p50'])}",
            f"{ms(w['p99'])} / {ms(d['p99'])}",
            f"{ms(w['max'])} / {ms(d['max'])}",
            f"{len(run['failures'])} ({run['refused_retried']} refused connects, "
            f"{run.get('unanswered_retried', '?')} closed kept-alive connections retried)",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standalone_run(args: argparse.Namespace) -> int:
    """``acme_registry.gc`` against the binary alone (plain restarts for the window)."""
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        work = Path(tmp)
        registry = RegistryProcess(work / "registry", free_port(), args.binary)
        with registry:
            skopeo = Skopeo(work / "skopeo", registry.ca.pem, [registry.name])
            pushed = push_history(
                skopeo,
                registry.host,
                registry.storage_root,
                work / "layout",
                tags=args.tags,
                shared_layers=args.shared_layers,
                own_layers=args.own_layers,
                layer_bytes=args.layer_bytes,
            )
            tree = FilesystemTree(registry.storage_root)
            blobs = blob_count(registry.storage_root)
            print(f"pushed {args.tags} tags, {blobs} blobs in {pushed:.1f} s", flush=True)

            session = registry_session(registry.name, registry.ca.pem, work / "session")
            api = gc.RegistryApi(f"https://127.0.0.1:{registry.port}", session)
            rules = RetentionRules(keep_last=args.keep_last)
            now = T0 + dt.timedelta(days=1)

            start = time.monotonic()
            _, plan = gc.plan_run(tree, rules, now)
            planned = time.monotonic() - start
            tag_delete = gc.supports_tag_delete(gc.registry_version(Path(args.binary)))
            start = time.monotonic()
            applied = gc.apply_plan(plan, api, tree, tag_delete=tag_delete)
            deleting = time.monotonic() - start
            result = gc.collect(
                tree,
                binary=Path(args.binary),
                config=registry.config_path(readonly=True),
                env=registry.env(),
                timeout=dt.timedelta(minutes=30),
                enter_readonly=lambda: registry.restart(readonly=True),
                leave_readonly=lambda: registry.restart(readonly=False),
            )
            left = blob_count(registry.storage_root)
    print(f"registry: {gc.registry_version(Path(args.binary))}")
    print(f"snapshot + plan: {planned:.2f} s ({len(plan.delete_manifests)} manifests selected)")
    print(
        f"API deletes: {deleting:.2f} s ({len(applied.removed_tags)} tags, errors {applied.errors})"
    )
    print(f"garbage-collect: {result.seconds:.2f} s, freed {result.freed_bytes} bytes")
    print(f"read-only window (2 restarts + count + collect): {result.readonly_seconds:.2f} s")
    print(f"blobs: {blobs} -> {left}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_collect", description=__doc__)
    parser.add_argument("--tags", type=int, default=40)
    parser.add_argument("--shared-layers", type=int, default=10)
    parser.add_argument("--own-layers", type=int, default=50, help="unique layers per tag")
    parser.add_argument("--layer-bytes", type=int, default=2048)
    parser.add_argument("--keep-last", type=int, default=5)
    parser.add_argument("--binary", default="/usr/bin/docker-registry")
    parser.add_argument("--agent", action="store_true", help="through acme-registry run")
    args = parser.parse_args(argv)
    if not args.agent:
        return standalone_run(args)
    with tempfile.TemporaryDirectory(prefix="bench-gc-agent-") as tmp:
        run = agent_run(
            Path(tmp),
            Path(args.binary),
            tags=args.tags,
            shared_layers=args.shared_layers,
            own_layers=args.own_layers,
            layer_bytes=args.layer_bytes,
            keep_last=args.keep_last,
        )
    print(table([run]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
