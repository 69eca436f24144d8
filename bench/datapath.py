"""Comparison 3: blob GET throughput and server CPU, skopeo push and pull, through each path.

The three paths run at the same time on one storage directory that holds the test blob:
ours (``acme-registry run``), Caddy in front of the registry, and the bare registry serving
TLS itself. Only one transfer runs at a time; the order alternates between rounds.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench import procstat
from bench.blobs import random_file, upload_blob
from bench.setups import NAME, BareRegistry, CaddyProxy, Ours, wait_for_v2
from tests.support.clients import Skopeo
from tests.support.load import image_digests
from tests.support.oci import make_oci_image
from tests.support.pebble import Pebble
from tests.support.ports import free_port

PATHS = ("ours", "caddy", "bare")
BIG_REPO = "bench/big"
LOAD_REPO = "bench/load"
LOAD_TAG = "v1"
PROTOCOLS = {"h1": "--http1.1", "h2": "--http2"}


@dataclass
class Served:
    """One running path: its port, what its clients trust, and its process groups."""

    key: str
    label: str
    port: int
    root_pem: bytes
    root_file: Path
    groups: Callable[[], dict[str, list[int]]]  # "added" and "registry" process ids

    def pids(self) -> list[int]:
        return [pid for pids in self.groups().values() for pid in pids]


@dataclass
class Fleet:
    """Every path up at once on one storage directory, plus the blob and the load image."""

    workdir: Path
    blob_bytes: int
    storage: Path = field(init=False)
    paths: dict[str, Served] = field(default_factory=dict)
    blob_digest: str = ""
    load_manifest: str = ""
    load_blob: str = ""
    ours: Ours | None = None
    caddy: CaddyProxy | None = None
    bare: BareRegistry | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __post_init__(self) -> None:
        self.storage = self.workdir / "storage"

    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        bare = BareRegistry(self.workdir / "bare", self.storage).start()
        self._stack.callback(bare.stop)
        wait_for_v2(bare.port, bare.root_pem)
        self.bare = bare

        blob_file = self.workdir / "blob.bin"
        self.blob_digest = random_file(blob_file, self.blob_bytes)
        upload_blob(bare.port, bare.root_pem, BIG_REPO, blob_file, self.blob_digest, self.workdir)
        blob_file.unlink()

        # The small image the load clients fetch (manifest GETs and 4 MB blob downloads).
        layout = self.workdir / "load-image"
        make_oci_image(layout, tag=LOAD_TAG, size=4 * 1024 * 1024)
        self.load_manifest, layers = image_digests(layout, LOAD_TAG)
        self.load_blob = layers[0]
        Skopeo(self.workdir / "skopeo-setup", bare.root_pem, [NAME]).push(
            layout, LOAD_TAG, f"{NAME}:{bare.port}/{LOAD_REPO}:{LOAD_TAG}"
        )

        pebble_ours = self._stack.enter_context(Pebble(self.workdir / "pebble-ours", free_port()))
        ours = Ours(self.workdir / "ours", pebble_ours, self.storage).start()
        self._stack.callback(ours.stop)
        wait_for_v2(ours.port, ours.root_pem)
        self.ours = ours

        pebble_caddy = self._stack.enter_context(Pebble(self.workdir / "pebble-caddy", free_port()))
        caddy = CaddyProxy(self.workdir / "caddy", pebble_caddy, self.storage).start()
        self._stack.callback(caddy.stop)
        wait_for_v2(caddy.port, caddy.root_pem)
        self.caddy = caddy

        def add(key: str, label: str, port: int, root_pem: bytes, groups: Any) -> None:
            root_file = self.workdir / f"root-{key}.pem"
            root_file.write_bytes(root_pem)
            self.paths[key] = Served(key, label, port, root_pem, root_file, groups)

        add(
            "ours",
            ours.label,
            ours.port,
            ours.root_pem,
            lambda: {"added": ours.added_pids(), "registry": ours.registry_pids()},
        )
        add(
            "caddy",
            caddy.label,
            caddy.port,
            caddy.root_pem,
            lambda: {"added": caddy.added_pids(), "registry": caddy.registry_pids()},
        )
        add(
            "bare",
            bare.label,
            bare.port,
            bare.root_pem,
            lambda: {"added": [], "registry": bare.registry_pids()},
        )


def curl_get(path: Served, url_path: str, flag: str) -> tuple[float, str, int]:
    """(bytes/s, negotiated HTTP version, bytes) for one verified GET with curl."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            flag,
            "--cacert",
            str(path.root_file),
            "--resolve",
            f"{NAME}:{path.port}:127.0.0.1",
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download} %{http_version} %{size_download}",
            f"https://{NAME}:{path.port}{url_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin"},  # no proxy settings: loopback only
    )
    if result.returncode != 0:
        raise RuntimeError(f"curl {flag} via {path.key}: {result.stderr.strip()[:300]}")
    speed, version, size = result.stdout.split()
    return float(speed), version, int(size)


def _blob_round(fleet: Fleet, path: Served, proto: str) -> dict[str, Any]:
    groups_before = path.groups()
    cpu_before = {g: procstat.cpu_snapshot(pids) for g, pids in groups_before.items()}
    speed, version, size = curl_get(
        path, f"/v2/{BIG_REPO}/blobs/{fleet.blob_digest}", PROTOCOLS[proto]
    )
    groups_after = path.groups()
    if size != fleet.blob_bytes:
        raise RuntimeError(f"{path.key}: got {size} bytes of {fleet.blob_bytes}")
    cpu = {
        g: procstat.cpu_delta(cpu_before[g], procstat.cpu_snapshot(groups_after.get(g, [])))
        for g in cpu_before
    }
    return {"speed": speed, "version": version, "cpu": cpu, "bytes": size}


def run(
    fleet: Fleet,
    rounds: int,
    skopeo_rounds: int,
    skopeo_mb: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "blob_bytes": fleet.blob_bytes,
        "rounds": rounds,
        "get": {key: {proto: [] for proto in PROTOCOLS} for key in PATHS},
        "skopeo": {key: {"push": [], "pull": []} for key in PATHS},
        "skopeo_rounds": skopeo_rounds,
        "skopeo_mb": skopeo_mb,
        "errors": [],
    }
    # One untimed GET per path: the blob in the page cache, connections and code paths warm.
    for path in fleet.paths.values():
        curl_get(path, f"/v2/{BIG_REPO}/blobs/{fleet.blob_digest}", "--http1.1")

    for index in range(rounds):
        order = PATHS if index % 2 == 0 else PATHS[::-1]
        for proto in PROTOCOLS:
            for key in order:
                try:
                    sample = _blob_round(fleet, fleet.paths[key], proto)
                except Exception as exc:
                    results["errors"].append(f"GET round {index + 1} {proto} {key}: {exc}")
                    continue
                results["get"][key][proto].append(sample)
                cpu = sum(sample["cpu"].values())
                log(
                    f"  GET round {index + 1} {proto} {key}: {sample['speed'] / 1e6:.0f} MB/s "
                    f"(HTTP/{sample['version']}), server CPU {cpu:.2f} s"
                )

    skopeos = {
        key: Skopeo(fleet.workdir / f"skopeo-{key}", path.root_pem, [NAME])
        for key, path in fleet.paths.items()
    }
    for index in range(skopeo_rounds):
        order = PATHS if index % 2 == 0 else PATHS[::-1]
        for key in order:
            path = fleet.paths[key]
            # A fresh random layer every time: nothing is already in the registry or cached.
            layout = fleet.workdir / f"push-{key}-{index}"
            make_oci_image(layout, tag="v1", size=skopeo_mb * 1024 * 1024)
            ref = f"{NAME}:{path.port}/bench/skopeo-{key}-{index}:v1"
            pulled = fleet.workdir / f"pull-{key}-{index}"
            try:
                started = time.monotonic()
                skopeos[key].push(layout, "v1", ref)
                pushed = time.monotonic()
                skopeos[key].pull(ref, pulled, "v1")
                done = time.monotonic()
            except Exception as exc:
                results["errors"].append(f"skopeo round {index + 1} {key}: {exc}"[:500])
                continue
            finally:
                shutil.rmtree(layout, ignore_errors=True)
                shutil.rmtree(pulled, ignore_errors=True)
            results["skopeo"][key]["push"].append(pushed - started)
            results["skopeo"][key]["pull"].append(done - pushed)
            log(
                f"  skopeo round {index + 1} {key}: push {pushed - started:.2f} s, "
                f"pull {done - pushed:.2f} s"
            )
    return results


def memory_by_process(pids: list[int]) -> list[dict[str, Any]]:
    rows = []
    for pid in pids:
        mem = procstat.memory(pid)
        rows.append(
            {
                "pid": pid,
                "name": procstat.exe_name(pid),
                "rss": mem.rss,
                "pss": mem.pss,
                "uss": mem.uss,
            }
        )
    return rows


def idle_memory(fleet: Fleet) -> dict[str, Any]:
    """RSS and PSS of every process group, with the per-process rows of what is added."""
    out: dict[str, Any] = {}
    for key, path in fleet.paths.items():
        groups = path.groups()
        out[key] = {group: {"processes": memory_by_process(pids)} for group, pids in groups.items()}
        for group in out[key].values():
            group["rss"] = sum(p["rss"] for p in group["processes"])
            group["pss"] = sum(p["pss"] for p in group["processes"])
            group["uss"] = sum(p["uss"] for p in group["processes"])
    return out
