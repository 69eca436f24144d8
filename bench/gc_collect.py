"""``python -m bench.gc_collect``: how long retention and a collection take (issue 13).

Pushes a CI-like history with skopeo to the registry binary on loopback (each tag: a few
layers shared by all, the rest its own), then runs retention (KEEP_LAST) and a collection
through ``acme_registry.gc`` and prints the phases' times. The read-only window here is two
plain restarts of the binary (stop, start read-only; stop, start read-write); the agent's
generations switch faster, so the window it measures is an upper bound of the product's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from acme_registry import gc
from acme_registry.gcconfig import RetentionRules
from acme_registry.registrytree import FilesystemTree, take_snapshot
from tests.support.clients import Skopeo, registry_session
from tests.support.oci_layers import add_image
from tests.support.ports import free_port
from tests.support.registry_process import RegistryProcess


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gc_collect", description=__doc__)
    parser.add_argument("--tags", type=int, default=40)
    parser.add_argument("--shared-layers", type=int, default=10)
    parser.add_argument("--own-layers", type=int, default=50, help="unique layers per tag")
    parser.add_argument("--layer-bytes", type=int, default=2048)
    parser.add_argument("--keep-last", type=int, default=5)
    parser.add_argument("--binary", default="/usr/bin/docker-registry")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        work = Path(tmp)
        registry = RegistryProcess(work / "registry", free_port(), args.binary)
        with registry:
            skopeo = Skopeo(work / "skopeo", registry.ca.pem, [registry.name])
            layout = work / "layout"
            shared = [(f"s{i}", os.urandom(args.layer_bytes)) for i in range(args.shared_layers)]
            start = time.monotonic()
            t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
            for n in range(args.tags):
                own = [(f"o{i}", os.urandom(args.layer_bytes)) for i in range(args.own_layers)]
                add_image(layout, f"b{n}", shared + own)
                skopeo.push(layout, f"b{n}", f"{registry.host}/bench/app:b{n}")
                link = (
                    registry.storage_root
                    / f"docker/registry/v2/repositories/bench/app/_manifests/tags/b{n}/current/link"
                )
                stamp = (t0 + dt.timedelta(minutes=n)).timestamp()
                os.utime(link, (stamp, stamp))
            pushed = time.monotonic() - start
            tree = FilesystemTree(registry.storage_root)
            blobs = len(take_snapshot(tree).blob_sizes)
            print(f"pushed {args.tags} tags, {blobs} blobs in {pushed:.1f} s", flush=True)

            session = registry_session(registry.name, registry.ca.pem, work / "session")
            api = gc.RegistryApi(f"https://127.0.0.1:{registry.port}", session)
            rules = RetentionRules(keep_last=args.keep_last)
            now = t0 + dt.timedelta(days=1)

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
            left = len(take_snapshot(tree).blob_sizes)
    print(f"registry: {gc.registry_version(Path(args.binary))}")
    print(f"snapshot + plan: {planned:.2f} s ({len(plan.delete_manifests)} manifests selected)")
    print(
        f"API deletes: {deleting:.2f} s ({len(applied.removed_tags)} tags, errors {applied.errors})"
    )
    print(f"garbage-collect: {result.seconds:.2f} s, freed {result.freed_bytes} bytes")
    print(f"read-only window (2 restarts + count + collect): {result.readonly_seconds:.2f} s")
    print(f"blobs: {blobs} -> {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
