"""The machine and the versions a benchmark ran with."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.support.pebble import PEBBLE_SID_DIR

REPO = Path(__file__).resolve().parents[1]
DEBIAN_PACKAGES = (
    "docker-registry",
    "caddy",
    "certbot",
    "python3-certbot-dns-rfc2136",
    "bind9",
    "pebble",
    "skopeo",
    "curl",
    "podman",
)
PYTHON_PACKAGES = ("acme", "supervisor", "cryptography", "requests", "matplotlib")


def _run(*cmd: str) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"


def image_size() -> dict[str, Any] | None:
    """Our image under podman, if one was built (the e2e tests build one); else None."""
    out = _run("podman", "images", "--format", "json")
    if not out:
        return None
    try:
        images = json.loads(out)
    except ValueError:
        return None
    found = []
    for image in images:
        names = image.get("Names") or image.get("names") or []
        # The product's image is named .../acme-registry:<tag>; the tests build others too.
        ours = [n for n in names if n.rsplit(":", 1)[0].rsplit("/", 1)[-1] == "acme-registry"]
        if ours:
            size = int(image.get("Size") or image.get("size") or 0)
            found.append((int(image.get("Created") or 0), ours[0], size))
    if not found:
        return None
    _, name, size = max(found)  # the newest
    return {"name": name, "bytes": size}


def _binary_mb(name: str) -> float:
    path = shutil.which(name)
    return Path(path).stat().st_size / 1e6 if path else 0.0


def describe() -> dict[str, Any]:
    versions = {}
    for package in DEBIAN_PACKAGES:
        versions[package] = _run("dpkg-query", "-W", "-f", "${Version}", package) or "-"
    sid_version = PEBBLE_SID_DIR / ".deb-version"
    versions["pebble (sid, for short certificates)"] = (
        sid_version.read_text().strip() if sid_version.exists() else "-"
    )
    for package in PYTHON_PACKAGES:
        try:
            versions[f"{package} (PyPI)"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[f"{package} (PyPI)"] = "-"
    commit = _run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = _run("git", "-C", str(REPO), "status", "--porcelain", "--", "src", "entrypoint")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_bytes": _mem_total(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "versions": versions,
        "commit": commit + (" (with uncommitted changes in src/)" if dirty else ""),
        "load_before": os.getloadavg()[0],
        "image": image_size(),
        "caddy_binary_mb": _binary_mb("caddy"),
    }
