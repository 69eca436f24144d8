"""``acme-registry run``: prepare the directories, then run supervisord.

supervisord, running in this process (PID 1 in the container), reaps children, handles
SIGTERM and supervises the agent and the registry generations; its configuration is
entrypoint/supervisord.conf.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from . import activation
from .config import ConfigError, Settings
from .ipprofile import check_ip_profile
from .listen import bind_address, raise_open_file_limit
from .registry import supervisord_conf
from .registry_socket import Handoff, RegistrySocket
from .storage import StoreUnsafe, ensure_private_dir

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)


EXIT_CONFIG = 2

__all__ = ["launch", "supervisord_conf"]


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


def handoff_socket(settings: Settings) -> Path:
    """Where registry generations fetch the shared listening socket (socket activation)."""
    return settings.run_dir / "registry.sock"


def supervisord_environment(settings: Settings, socket_activation: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Our settings, not the registry's: it warns about every REGISTRY_* name it does not know.
    env.pop("REGISTRY_BINARY", None)
    env.pop("REGISTRY_SOCKET_ACTIVATION", None)
    env.update(
        ACME_REGISTRY_RUN_DIR=str(settings.run_dir),
        ACME_REGISTRY_REGISTRY_BINARY=str(settings.registry_binary),
        ACME_REGISTRY_CONFIG_DIR=str(settings.registry_config_dir),
        # This process's stdout, which the registry writes to directly.
        ACME_REGISTRY_LOG=f"/proc/{os.getpid()}/fd/1",
        # The registry drains for drain_seconds after SIGTERM; give it a little more.
        ACME_REGISTRY_STOP_WAIT=str(int(settings.drain_seconds) + 5),
        # Non-empty: each generation runs through the exec wrapper that fetches the socket.
        ACME_REGISTRY_HANDOFF=str(handoff_socket(settings)) if socket_activation else "",
        ACME_REGISTRY_PYTHON=sys.executable,
    )
    if settings.auth_mode == "token" and any(n.upper().startswith("REGISTRY_STORAGE") for n in env):
        # Storage configured through the environment replaces the config file's storage
        # section, and with it the storage.delete.enabled that token mode's grants need.
        env.setdefault("REGISTRY_STORAGE_DELETE_ENABLED", "true")
    # registry 3.x initialises OpenTelemetry from the environment and fails without this.
    env.setdefault("OTEL_TRACES_EXPORTER", "none")
    return env


def uses_socket_activation(settings: Settings) -> bool:
    """REGISTRY_SOCKET_ACTIVATION resolved against the binary; ConfigError for on with 2.x."""
    if settings.socket_activation == "off":
        return False
    output = activation.binary_version(str(settings.registry_binary))
    version = activation.parse_version(output)
    try:
        chosen = activation.choose(settings.socket_activation, version)
    except activation.ActivationUnsupported as error:
        raise ConfigError("REGISTRY_SOCKET_ACTIVATION", str(error)) from None
    if version is None:
        first_line = output.strip().splitlines()[0] if output.strip() else "nothing"
        log.warning(
            "%s --version printed %r, not a known registry release; %s",
            settings.registry_binary,
            first_line[:120],
            "socket activation on as REGISTRY_SOCKET_ACTIVATION=on says"
            if chosen
            else "handing over through a FIFO (set REGISTRY_SOCKET_ACTIVATION=on for 3.x)",
        )
    return chosen


def bind_problem(variable: str, port: int, error: OSError) -> str:
    """One line naming the setting and the fix for a port that cannot be bound."""
    advice = ""
    if error.errno == errno.EACCES:
        advice = (
            ": ports below 1024 need net.ipv4.ip_unprivileged_port_start=0 in the "
            "container's network namespace (docker run does it; podman run needs "
            "--sysctl net.ipv4.ip_unprivileged_port_start=0), or choose a port >= 1024"
        )
    elif error.errno == errno.EADDRINUSE:
        advice = ": something else listens there"
    uid = os.getuid()
    return f"{variable} port {port} cannot be bound by uid {uid} ({error.strerror}){advice}"


def check_bindable(variable: str, host: str, port: int) -> str | None:
    """One line naming the setting and the fix when ``port`` cannot be bound, else None."""
    try:
        bind_address(host, port).close()
    except OSError as error:
        return bind_problem(variable, port, error)
    return None


def launch(settings: Settings) -> int:
    # First, because it is a configuration error (exit 2, nothing written yet).
    try:
        socket_activation = uses_socket_activation(settings)
        check_ip_profile(settings)
    except ConfigError as error:
        print(f"acme-registry: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    raise_open_file_limit()
    checks = [check_writable("DATA_DIR", settings.data_dir)]
    checks.append(check_writable("CERT_DIR", settings.cert_dir))
    storage = settings.registry_env.get("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
    if not any(name.upper().startswith("REGISTRY_STORAGE") for name in settings.registry_env):
        storage = "/var/lib/registry"
    if storage:
        checks.append(check_writable("the registry's storage", Path(storage)))
    if settings.http_port:  # 0: ACME_HTTP_PORT=off
        checks.append(check_bindable("ACME_HTTP_PORT", "", settings.http_port))
    if settings.token is not None:
        token_addr = settings.token.addr
        checks.append(check_bindable("TOKEN_ADDR", token_addr.host, token_addr.port))
    for problem in checks:
        if problem:
            print(f"acme-registry: {problem}", file=sys.stderr)
            return 1
    addr = settings.registry_addr
    try:
        # The real bind, held from now on: the error is exact, and nothing can take the
        # port between this check and the first generation.
        registry_socket = RegistrySocket.bind(addr.host, addr.port, socket_activation)
    except OSError as error:
        print(
            f"acme-registry: {bind_problem('REGISTRY_HTTP_ADDR', addr.port, error)}",
            file=sys.stderr,
        )
        return 1
    log.info(
        "registry generations %s",
        "share the agent's listening socket (socket activation)"
        if socket_activation
        else "bind the address themselves, handed over through a config FIFO",
    )
    ensure_private_dir(settings.data_dir)
    ensure_private_dir(settings.run_dir)
    settings.supervisor_socket.unlink(missing_ok=True)
    conf = supervisord_conf()
    env = supervisord_environment(settings, socket_activation)
    os.environ.clear()  # supervisord passes its own environment to every program
    os.environ.update(env)

    from .agent import Agent

    handoff = Handoff(handoff_socket(settings), registry_socket) if socket_activation else None
    try:
        agent = Agent(settings, registry_socket)
    except StoreUnsafe as error:
        # A store that ignores conditional writes would let two replicas both order.
        print(f"acme-registry: {error}", file=sys.stderr)
        registry_socket.close()
        return 1
    try:
        if handoff is not None:
            handoff.start()
        agent.start()
    except OSError as error:
        print(f"acme-registry: cannot start: {error}", file=sys.stderr)
        agent.stop()
        if handoff is not None:
            handoff.stop()
        registry_socket.close()
        return 1
    try:
        return _run_supervisord(conf, agent)
    finally:
        agent.stop()
        if handoff is not None:
            handoff.stop()
        registry_socket.close()


def _run_supervisord(conf: Path, agent: Agent) -> int:
    """Run supervisord in this process (PID 1 in the container) until it shuts down.

    In-process rather than exec'd, so that when a program gives up (FATAL), or the agent
    does, we can shut everything down and exit non-zero: the orchestrator then sees the
    failure and restarts the container. supervisord itself cannot choose its exit status.
    The agent's loop runs on a thread of this process, started once supervisord's own
    loop (and so its XML-RPC socket) runs.
    """
    from supervisor import events, supervisord
    from supervisor.medusa import asyncore_25 as asyncore
    from supervisor.options import ServerOptions
    from supervisor.states import SupervisorStates

    gave_up: list[str] = []
    running: list[supervisord.Supervisor] = []

    def shutting_down() -> bool:
        # A SIGTERM (docker stop) already ends the run: what fails while programs are being
        # stopped is no reason to exit non-zero.
        return bool(running) and running[-1].options.mood < SupervisorStates.RUNNING

    def give_up(what: str) -> None:
        if shutting_down():
            log.info("%s stopped while shutting down", what)
            return
        gave_up.append(what)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_fatal(event: events.ProcessStateFatalEvent) -> None:
        give_up(event.process.config.name)

    def maintain() -> None:
        try:
            agent.maintain_forever()
        except Exception:
            if shutting_down():
                log.info("the agent's loop ended while shutting down", exc_info=True)
                return
            log.exception("the agent failed")
            give_up("the agent")

    class Supervisord(supervisord.Supervisor):
        def runforever(self) -> None:
            running.append(self)
            # run() clears every event subscription just before this; subscribe here.
            events.subscribe(events.ProcessStateFatalEvent, on_fatal)
            if not any(t.name == "agent" for t in threading.enumerate()):
                threading.Thread(target=maintain, name="agent", daemon=True).start()
            super().runforever()

    first = True
    while True:  # the same loop as supervisord.main(): SIGHUP restarts in place
        options = ServerOptions()
        options.realize(["-n", "-c", str(conf)], doc=supervisord.__doc__)
        options.first = first
        options.test = False
        with contextlib.suppress(asyncore.ExitNow):  # how supervisord ends its loop
            Supervisord(options).main()
        options.close_httpservers()
        options.close_logger()
        first = False
        if options.mood < SupervisorStates.RESTARTING or gave_up:
            break
    if gave_up:
        print(
            f"acme-registry: {', '.join(gave_up)} kept failing and gave up; exiting with status 1",
            file=sys.stderr,
        )
        return 1
    return 0
