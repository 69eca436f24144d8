"""``acme-registry run``: prepare the directories, then become supervisord.

supervisord (PID 1 in the container) reaps children, forwards SIGTERM and supervises the
agent and the registry generations; its configuration is entrypoint/supervisord.conf.
"""

from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

from .config import Settings
from .storage import ensure_private_dir

WAKE_TIMEOUT = 5.0


def supervisord_conf() -> Path:
    """The packaged supervisord.conf; in a source checkout, the one in entrypoint/."""
    packaged = resources.files("acme_registry") / "supervisord.conf"
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "entrypoint" / "supervisord.conf"
    if checkout.is_file():
        return checkout
    raise FileNotFoundError("supervisord.conf is missing from the installation")


def check_writable(variable: str, path: Path) -> str | None:
    """One line naming the path and the fix when ``path`` cannot be written, else None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        uid, gid = os.getuid(), os.getgid()
        return (
            f"{variable} {path} is not writable by uid {uid} ({error.strerror}): "
            f"on the host run `chown -R {uid}:{gid}` on the directory or volume mounted there"
        )
    return None


def supervisord_environment(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REGISTRY_BINARY", None)
    env.update(
        ACME_REGISTRY_RUN_DIR=str(settings.run_dir),
        ACME_REGISTRY_PYTHON=sys.executable,
        ACME_REGISTRY_REGISTRY_BINARY=str(settings.registry_binary),
        ACME_REGISTRY_CONFIG=str(settings.registry_config),
        # The registry drains for drain_seconds after SIGTERM; give it a little more.
        ACME_REGISTRY_STOP_WAIT=str(int(settings.drain_seconds) + 5),
    )
    # registry 3.x initialises OpenTelemetry from the environment and fails without this.
    env.setdefault("OTEL_TRACES_EXPORTER", "none")
    return env


def launch(settings: Settings) -> int:
    for variable, path in (("DATA_DIR", settings.data_dir), ("CERT_DIR", settings.cert_dir)):
        problem = check_writable(variable, path)
        if problem:
            print(f"acme-registry: {problem}", file=sys.stderr)
            return 1
    ensure_private_dir(settings.data_dir)
    ensure_private_dir(settings.run_dir)
    socket_path = settings.supervisor_socket
    if socket_path.exists():
        socket_path.unlink()
    conf = supervisord_conf()
    env = supervisord_environment(settings)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        _wake_supervisord(socket_path)
        os._exit(0)
    argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)]
    os.execve(sys.executable, argv, env)
    return 1  # not reached


def _wake_supervisord(socket_path: Path) -> None:
    """Poke supervisord's socket once it exists.

    supervisord's main loop first waits up to a second before starting autostart
    programs; a request on its socket ends that wait, so the agent starts ~1 s sooner.
    """
    from .registry import Supervisor

    deadline = time.monotonic() + WAKE_TIMEOUT
    while time.monotonic() < deadline:
        if socket_path.exists():
            try:
                Supervisor(socket_path).states("agent")
                return
            except OSError:
                pass
        time.sleep(0.005)
