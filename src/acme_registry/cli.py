"""The ``acme-registry`` command. Thin: each subcommand hands over to its module.

Heavy modules are imported inside the subcommands, so ``health`` (run by the container's
HEALTHCHECK every few seconds) starts fast and small.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .config import Settings

EXIT_CONFIG = 2


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments (an unknown grant flag such as ``--write``) get one line naming them and
    exit 2, like any other bad input, instead of argparse's usage block."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="acme-registry", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{run,check,health,status,renew,gc,user,dns-persist-record}",
    )
    commands.add_parser("run", help="start supervisord, the agent and the registry")
    commands.add_parser("check", help="validate the configuration and exit (0 or 2)")
    health = commands.add_parser("health", help="exit 0 while the agent is alive")
    health.add_argument(
        "--ready", action="store_true", help="exit 0 only while a valid certificate is served"
    )
    status = commands.add_parser("status", help="the certificate and renewal state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    renew = commands.add_parser("renew", help="renew now through the running agent")
    renew.add_argument(
        "--dry-run",
        action="store_true",
        help="a full order against the staging (dry-run) directory; the live certificate stays",
    )
    collect = commands.add_parser(
        "gc", help="retention and garbage collection now, through the running agent"
    )
    collect.add_argument(
        "--dry-run", action="store_true", help="print what retention would remove; change nothing"
    )
    user = commands.add_parser("user", help="registry users (AUTH_MODE=htpasswd or token)")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser(
        "add", help="add a user or set a password (read from stdin, or generated and printed)"
    )
    add.add_argument("name")
    # Token mode's run-time grants; given any, they replace the user's earlier ones.
    for action in ("pull", "push", "delete"):
        add.add_argument(
            f"--{action}",
            action="append",
            default=None,
            metavar="PATTERN",
            help=f"AUTH_MODE=token: may {action} repositories matching PATTERN (repeatable)",
        )
    add.add_argument(
        "--catalog", action="store_true", help="AUTH_MODE=token: may list the repositories"
    )
    remove = user_commands.add_parser("remove", help="remove a user added at run time")
    remove.add_argument("name")
    user_commands.add_parser("list", help="the users and where each comes from")
    persist = commands.add_parser(
        "dns-persist-record",
        help="dns-persist-01: the TXT record(s) to create once (registers the account if needed)",
    )
    persist.add_argument("--json", action="store_true", help="machine-readable output")
    issue = commands.add_parser("issue", help=argparse.SUPPRESS)
    issue.add_argument("--replaces", default=None)
    issue.add_argument("--dry-run", action="store_true")
    # A shared store: the certificate record's version the agent saw ("" when absent),
    # and when the agent started (unix seconds).
    issue.add_argument("--record-version", default=None)
    issue.add_argument("--agent-started", type=float, default=None)
    args = parser.parse_args(argv)

    if args.command in ("health", "status", "renew"):
        return _ask_agent(args)
    if args.command == "user":
        return _user(args)
    if args.command == "gc":
        return _gc(args)
    settings = _settings_or_exit()
    if isinstance(settings, int):
        return settings
    # The issuing child answers on stdout; its log lines go to stderr, which it shares
    # with the agent. dns-persist-record's stdout is the record(s) alone, for scripts.
    _setup_logging(
        settings.log_level,
        settings.log_format,
        sys.stderr if args.command in ("issue", "dns-persist-record") else sys.stdout,
    )
    if args.command == "check":
        return _check_registry_binary(settings)
    if args.command == "run":
        from .launcher import launch

        return launch(settings)
    if args.command == "dns-persist-record":
        return _dns_persist_record(settings, as_json=args.json)
    from .issuer import run

    result = run(
        settings,
        replaces=args.replaces,
        dry_run=args.dry_run,
        record_version=args.record_version,
        agent_started=args.agent_started,
    )
    print(result.to_json(), flush=True)
    return 0 if result.ok else 1


def _settings_or_exit() -> Settings | int:
    from .config import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as error:
        print(f"acme-registry: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG


def _dns_persist_record(settings: Settings, *, as_json: bool) -> int:
    from . import dnspersist
    from .config import ConfigError
    from .issuer import IssuanceError, persist_records

    if settings.challenge != "dns-persist-01":
        print(
            "acme-registry: configuration error: ACME_CHALLENGE: dns-persist-record needs "
            "ACME_CHALLENGE=dns-persist-01",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        records = persist_records(settings)
    except ConfigError as error:
        print(f"acme-registry: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except IssuanceError as error:
        print(f"acme-registry: {error}", file=sys.stderr)
        return 1
    rendered = dnspersist.render_json(records) + "\n" if as_json else None
    print(rendered or dnspersist.render_zone_lines(records), end="")
    return 0


def _check_registry_binary(settings: Settings) -> int:
    """REGISTRY_SOCKET_ACTIVATION against the binary's --version, as `run` checks it."""
    from .config import ConfigError
    from .launcher import uses_socket_activation

    try:
        uses_socket_activation(settings)
    except ConfigError as error:
        print(f"acme-registry: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event)


def _setup_logging(level: str, log_format: str, stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"
            )
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # The acme library logs every request and response body at DEBUG, keys included.
    logging.getLogger("acme").setLevel(max(logging.INFO, logging.getLogger().level))
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _ask_agent(args: argparse.Namespace) -> int:
    from .control import request

    socket_path = _control_socket()
    command = "ready" if getattr(args, "ready", False) else args.command
    fields = {"dry_run": True} if getattr(args, "dry_run", False) else {}
    try:
        # A renewal waits for a whole order; the rest answer at once.
        answer = request(socket_path, command, timeout=600 if command == "renew" else 10, **fields)
    except OSError as error:
        print(
            f"acme-registry: the agent does not answer on {socket_path}: {error}", file=sys.stderr
        )
        return 1
    if args.command == "status":
        print(json.dumps(answer, indent=2) if args.json else _format_status(answer))
        return 0
    if command == "renew":
        if not answer.get("ok"):
            print(f"acme-registry: renewal failed: {answer.get('error')}", file=sys.stderr)
            return 1
        what = (
            "dry run succeeded: the CA issued" if answer.get("dry_run") else "renewed: now serving"
        )
        print(f"{what} serial {answer.get('serial')}, valid until {answer.get('not_after')}")
        return 0
    if not answer.get("ok"):
        print(f"not {'ready' if command == 'ready' else 'healthy'}: {answer.get('error')}")
        return 1
    print("ready" if command == "ready" else "alive")
    return 0


def _gc(args: argparse.Namespace) -> int:
    """Waits for the whole run: the read-only window is bounded by GC_TIMEOUT."""
    from .control import request

    try:
        answer = request(_control_socket(), "gc", timeout=24 * 3600, dry_run=args.dry_run)
    except OSError as error:
        print(f"acme-registry: the agent does not answer: {error}", file=sys.stderr)
        return 1
    if args.dry_run and answer.get("lines"):
        print("\n".join(answer["lines"]))
        return 0
    if answer.get("joined"):
        # One run at a time: this one was going already; its result is the answer.
        print(f"{answer['joined']} was in progress; waited for it to finish; its result:")
    if not answer.get("ok"):
        print(f"acme-registry: garbage collection failed: {answer.get('error')}", file=sys.stderr)
        return 1
    print(
        f"{answer.get('tags_removed')} tag(s) removed, {answer.get('manifests_deleted')} "
        f"manifest(s) deleted, {answer.get('freed_bytes')} byte(s) freed, read-only for "
        f"{answer.get('readonly_seconds')} s"
    )
    for kept in answer.get("tags_kept") or []:
        print(f"kept: {kept}")
    return 0


def _control_socket() -> Path:
    data_dir = Path(os.environ.get("DATA_DIR", "").strip() or "/data")
    return data_dir / "run" / "agent.sock"


def _user(args: argparse.Namespace) -> int:
    """Users go through the running agent: it is the only writer of the htpasswd file."""
    from .control import request

    fields: dict[str, Any] = {}
    grants = _grant_flags(args) if args.user_command == "add" else None
    if isinstance(grants, str):
        print(f"acme-registry: {grants}", file=sys.stderr)
        return EXIT_CONFIG
    if args.user_command == "add":
        password: str | None
        from .auth import read_password

        if sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"password for {args.name}: ")
            if password != getpass.getpass("again: "):
                print("acme-registry: the passwords differ", file=sys.stderr)
                return 1
        else:
            password = read_password(sys.stdin)
        # Without one the agent generates it, and hashes it at the cost for generated ones.
        fields = (
            {"name": args.name, "password": password}
            if password
            else {"name": args.name, "generate": True}
        )
        if grants is not None:
            fields["grants"] = grants
    elif args.user_command == "remove":
        fields = {"name": args.name}
    try:
        answer = request(_control_socket(), f"user-{args.user_command}", **fields)
    except OSError as error:
        print(f"acme-registry: the agent does not answer: {error}", file=sys.stderr)
        return 1
    if not answer.get("ok"):
        print(f"acme-registry: {answer.get('error')}", file=sys.stderr)
        return 1
    if args.user_command == "list":
        grants_of = answer.get("grants")
        for name, origin in sorted(answer.get("users", {}).items()):
            if grants_of is None:
                print(f"{name}\t{origin}")
            else:
                print(f"{name}\t{origin}\t{grants_of.get(name, 'everything')}")
    elif args.user_command == "add":
        print(f"user {args.name} {'added' if answer.get('created') else 'updated'}")
        generated = answer.get("password")
        if generated:
            print(f"password (shown once): {generated}")
    else:
        print(f"user {args.name} removed")
    return 0


def _grant_flags(args: argparse.Namespace) -> dict[str, Any] | str | None:
    """The grant flags of ``user add`` as stored (None: no flag, keep the user's grants),
    or the one-line problem with a pattern."""
    from .auth import grants_record
    from .policy import PolicyError, make_grants

    if not (args.pull or args.push or args.delete or args.catalog):
        return None
    try:
        for action in ("pull", "push", "delete"):
            patterns: dict[str, Any] = {action: getattr(args, action) or []}
            make_grants(**patterns, source=f"--{action}")
    except PolicyError as error:
        return str(error)
    return grants_record(args.pull or [], args.push or [], args.delete or [], args.catalog)


def _format_status(answer: dict[str, Any]) -> str:
    lines = [f"domains:     {', '.join(answer.get('domains', []))}"]
    lines.append(f"directory:   {answer.get('directory')}")
    cert = answer.get("certificate")
    if cert:
        lines += [
            f"issuer:      {cert['issuer']}",
            f"serial:      {cert['serial']}",
            f"not after:   {cert['not_after']}",
            f"renewal:     {cert['renewal']['at']} ({cert['renewal']['reason']})",
        ]
    else:
        lines.append("certificate: none yet")
    if answer.get("problem"):
        lines.append(f"problem:     {answer['problem']}")
    if answer.get("dns_persist_problem") and answer["dns_persist_problem"] != answer.get("problem"):
        lines.append(f"dns-persist: {answer['dns_persist_problem']}")
    backoff = answer.get("backoff") or {}
    if backoff.get("failures"):
        lines += [
            f"last error:  {backoff.get('last_error')} (at {backoff.get('last_attempt')})",
            f"backoff:     {backoff['failures']} failure(s) in a row",
            f"next try:    {backoff.get('next_attempt')}",
        ]
    shared = answer.get("state_store") or {}
    if shared.get("store") not in (None, "file"):
        reachable = "reachable"
        if not shared.get("reachable"):
            reachable = f"UNREACHABLE: {shared.get('error')}"
        lines.append(f"state store: {shared['store']}, {reachable}")
    return "\n".join(lines + _format_gc_status(answer.get("gc")))


def _format_gc_status(gc: dict[str, Any] | None) -> list[str]:
    if not gc:
        return []
    lines = [f"gc:          {gc.get('schedule')}, next run {gc.get('next_run') or 'none'}"]
    last = gc.get("last_run")
    if last:
        lines.append(
            f"last gc:     {last.get('started')} {last.get('result')}: "
            f"{last.get('tags_removed')} tag(s) removed, {last.get('freed_bytes')} byte(s) freed"
        )
        if last.get("error"):
            lines.append(f"gc error:    {last['error']}")
    return lines
