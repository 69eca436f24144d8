"""A registry binary whose `garbage-collect` waits for the test: a read-only window that
lasts until released, instead of one a test would have to catch in time.

`serve` and `--version` are the real binary's (exec'd); only `garbage-collect` first writes
its pid to ``started`` and waits (at most ``limit`` seconds) for ``release`` to exist.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import time
from pathlib import Path


class HeldCollection:
    def __init__(self, workdir: Path, real_binary: Path, limit: float = 120) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.started = workdir / "gc-started"
        self.release_file = workdir / "gc-release"
        self.binary = workdir / "registry-held-gc"
        self.binary.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = garbage-collect ]; then\n'
            f"  echo $$ > {shlex.quote(str(self.started))}\n"
            f"  i=0; while [ ! -e {shlex.quote(str(self.release_file))} ] "
            f"&& [ $i -lt {int(limit * 10)} ]; do sleep 0.1; i=$((i+1)); done\n"
            "fi\n"
            f'exec {shlex.quote(str(real_binary))} "$@"\n'
        )
        self.binary.chmod(0o755)

    def wait_started(self, timeout: float = 60) -> int:
        """The pid of the waiting garbage-collect, once the window has begun."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(self.started.read_text().strip())
            time.sleep(0.05)
        raise TimeoutError(f"garbage-collect did not start within {timeout} s")

    def release(self) -> None:
        self.release_file.touch()

    def kill(self) -> None:
        """Kill the waiting garbage-collect (its own session: nothing else reaches it)."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(self.started.read_text().strip()), signal.SIGKILL)


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of session ``sid``, as the death of a container's PID 1 does
    (supervisord's programs are in their own process groups, not in its)."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def serving_registries(sid: int) -> list[int]:
    """The pids of session ``sid``'s ``<registry> serve CONFIG`` processes (the generations)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if os.getsid(int(entry.name)) == sid and len(argv) > 2 and argv[1] == b"serve":
                pids.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids
