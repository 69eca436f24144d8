"""Registry users and the htpasswd file the registry reads (``AUTH_MODE=htpasswd``).

Users come from two places, combined by :class:`UserStore`:

- the environment: ``AUTH_USERS`` (``name:password`` pairs) and ``AUTH_USERS_FILE`` (lines
  of ``name:password`` or ``name:<bcrypt hash>``), parsed by :func:`load_env_users`. They
  are always present with the environment's password: ``user add``/``user remove`` refuse
  them with an error naming the variable, and a run-time user of the same name is shadowed.
- run time: ``acme-registry user add/remove``, stored in ``DATA_DIR/auth/users.json``,
  added on top of the environment's users.

With neither source set and no run-time user ever created, :meth:`UserStore.ensure_initial_admin`
creates ``admin`` with a random password written to ``initial-admin-password``. It does
so once: an operator who later removes every user gets no new admin behind their back.

Run-time users and the initial password live in :class:`~.storage.Storage` (keys in
:mod:`statekeys`; with the file backend ``DATA_DIR/auth``, 0700, files 0600), changed
under the storage lock ``users``: the agent and a CLI may both write.

==========================  ==================================================================
``users.json``              run-time users (name -> bcrypt hash) and whether the admin was made
``initial-admin-password``  the generated admin password; deleted once admin's password changes
``htpasswd``                derived, not stored: the registry's ``auth.htpasswd.path``, a local
                            file written from the above; bcrypt only; rewritten only when its
                            content changes, because the registry re-reads on mtime
==========================  ==================================================================

No message raised or returned here contains a password or a hash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import statekeys
from .names import is_user_name
from .storage import Storage, ensure_private_dir, json_bytes, write_atomic

log = logging.getLogger(__name__)

# Every authenticated request makes the registry run one bcrypt comparison (it caches
# nothing), and a push is dozens of requests: ~50 ms each at cost 10 on a small CPU, four
# times that at 12. 10 keeps pushes fast while still costing a guesser ~50 ms per try.
DEFAULT_COST = 10
MIN_COST = 4  # the lowest golang.org/x/crypto/bcrypt accepts
# Passwords the agent generates have 192 bits of entropy (generate_password): guessing them
# is infeasible at any cost, so they get the cheapest hash and the registry answers ~45x
# faster for them. Passwords a person chose keep DEFAULT_COST.
GENERATED_COST = MIN_COST
MAX_COST = 31
MAX_PASSWORD_BYTES = 72  # bcrypt ignores the rest; the bcrypt package refuses longer ones
INITIAL_ADMIN = "admin"
RUNTIME = "run-time"

# The registry's bcrypt (golang.org/x/crypto) reads every 2x variant the same way.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# Other htpasswd formats (MD5 apr1, SHA, crypt's $5$/$6$, argon2): the registry never
# matches them, so accepting them would lock the user out without a word.
_OTHER_HASH = re.compile(r"(\$[A-Za-z0-9]{1,10}\$|\{SHA\}|\$argon2)")
_HTPASSWD_HEADER = (
    "# Written by acme-registry from AUTH_USERS, AUTH_USERS_FILE and `acme-registry user`.\n"
    "# Edits here are overwritten; manage users with those instead.\n"
)


class AuthError(ValueError):
    """Users or passwords are wrong. ``str()`` is one line and never holds a secret."""


class UsersFormatError(AuthError):
    """A user definition in ``source`` (a variable name) is malformed.

    ``problem`` names the entry or line ("line 3: ..."), so a caller can report it as
    ``source: problem``, as :class:`~acme_registry.config.ConfigError` does.
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass(frozen=True)
class Credential:
    """A configured password: plain text to hash, or a bcrypt hash kept as given."""

    secret: str = field(repr=False)
    hashed: bool
    source: str = RUNTIME


# -- parsing ---------------------------------------------------------------------------------


def valid_name(name: str) -> bool:
    return is_user_name(name)


def is_bcrypt_hash(value: str) -> bool:
    return _BCRYPT.fullmatch(value) is not None


def password_problem(password: str) -> str | None:
    """Why ``password`` cannot be used, or None. The reason never quotes the password."""
    if not password:
        return "the password is empty"
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        return f"the password is longer than {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)"
    if any(c in password for c in "\0\r\n"):
        return "the password contains a NUL or line break"
    return None


def _parse_entry(text: str, source: str, where: str) -> tuple[str, Credential]:
    name, colon, value = text.partition(":")
    if not colon:
        # The whole entry may be a password written without its name: never echo it.
        raise UsersFormatError(source, f"{where}: expected name:password")
    if not valid_name(name):
        raise UsersFormatError(
            source, f"{where}: the user name is not 1-64 of A-Z a-z 0-9 . _ - characters"
        )
    if is_bcrypt_hash(value):
        return name, Credential(value, hashed=True, source=source)
    if value.startswith("$2"):
        raise UsersFormatError(source, f"{where}: user {name!r} has a malformed bcrypt hash")
    if _OTHER_HASH.match(value):
        raise UsersFormatError(
            source,
            f"{where}: user {name!r} has a hash the registry cannot check; it accepts bcrypt "
            "only (htpasswd -B), or give the password in plain text",
        )
    problem = password_problem(value)
    if problem:
        raise UsersFormatError(source, f"{where}: user {name!r}: {problem}")
    return name, Credential(value, hashed=False, source=source)


def _parse(
    pieces: list[str], source: str, unit: str, into: dict[str, Credential]
) -> dict[str, Credential]:
    seen: dict[str, str] = {}
    for number, raw in enumerate(pieces, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{unit} {number}"
        name, credential = _parse_entry(text, source, where)
        if name in seen:
            raise UsersFormatError(source, f"{where}: user {name!r} is already on {seen[name]}")
        if name in into:
            raise UsersFormatError(
                source, f"{where}: user {name!r} is already defined in {into[name].source}"
            )
        seen[name] = where
        into[name] = credential
    return into


def _auth_users_entries(value: str) -> list[str]:
    return value.splitlines() if "\n" in value else value.split(",")


def load_env_users(users: str | None, users_file_text: str | None) -> dict[str, Credential]:
    """The environment's users: ``AUTH_USERS`` and the content of ``AUTH_USERS_FILE``.

    ``AUTH_USERS``: ``name:password`` entries separated by newlines, or by commas when there
    is none (a password holding a comma needs the newline form or the file). The file:
    lines of ``name:password`` or ``name:<bcrypt hash>``; blank and ``#`` lines skipped.
    Surrounding spaces are dropped, as the registry drops them in htpasswd. Both may be
    given; a name defined in both is an error rather than a silent choice.
    """
    found: dict[str, Credential] = {}
    if users is not None:
        _parse(_auth_users_entries(users), "AUTH_USERS", "entry", found)
    if users_file_text is not None:
        _parse(users_file_text.splitlines(), "AUTH_USERS_FILE", "line", found)
    return found


def parse_htpasswd(text: str) -> dict[str, str]:
    """name -> hash of an htpasswd file as the registry reads it (no validation)."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, _, value = line.partition(":")
            entries[name] = value
    return entries


# -- hashing ---------------------------------------------------------------------------------


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    problem = password_problem(password)
    if problem:
        raise AuthError(problem)
    if not MIN_COST <= cost <= MAX_COST:
        raise AuthError(f"bcrypt cost {cost} is outside {MIN_COST}-{MAX_COST}")
    import bcrypt  # here, not at the top: config parses users without loading bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def check_password(password: str, hashed: str) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:  # a malformed hash or an over-long password
        return False


def hash_cost(hashed: str) -> int | None:
    return int(hashed[4:6]) if is_bcrypt_hash(hashed) else None


def generate_password() -> str:
    """32 URL-safe characters (192 bits): no quoting trouble in shells or docker login."""
    return secrets.token_urlsafe(24)


def read_password(stream: TextIO) -> str | None:
    """The first line of ``stream`` without its line ending; None when there is none.

    For ``echo pw | docker exec -i C acme-registry user add NAME``; None tells the caller to
    generate a password instead (``docker exec`` without ``-i`` gives an empty stdin).
    """
    line = stream.readline(4096)
    password = line.rstrip("\r\n")
    return password or None


def registry_auth_config(htpasswd_path: Path, realm: str) -> dict[str, Any]:
    """The value of the registry config's ``auth`` key: ``{"htpasswd": {realm, path}}``."""
    return {"htpasswd": {"realm": realm, "path": str(htpasswd_path)}}


# -- the store -------------------------------------------------------------------------------


@dataclass
class _State:
    users: dict[str, str] = field(default_factory=dict)
    initial_admin: bool = False
    # Token mode's run-time grants, as stored: name -> {"pull": [...], "push": [...],
    # "delete": [...], "catalog": bool}; validated with policy.make_grants when read.
    grants: dict[str, dict[str, Any]] = field(default_factory=dict)


GRANT_ACTIONS = ("pull", "push", "delete")


def grants_record(
    pull: list[str], push: list[str], delete: list[str], catalog: bool
) -> dict[str, Any]:
    """How run-time grants are stored (and sent on the control socket)."""
    return {"pull": list(pull), "push": list(push), "delete": list(delete), "catalog": catalog}


def _stored_grants(record: dict[str, Any]) -> dict[str, Any]:
    """A checked grants record (:func:`_grants_problem`) as it is stored."""
    return grants_record(
        record.get("pull", []),
        record.get("push", []),
        record.get("delete", []),
        record.get("catalog", False),
    )


def _grants_problem(record: Any) -> str | None:
    """Why ``record`` is not stored grants (names the flag), or None."""
    from .policy import PolicyError, make_grants

    if not isinstance(record, dict) or set(record) - {*GRANT_ACTIONS, "catalog"}:
        return "grants are {pull, push, delete: [patterns], catalog: bool}"
    lists = {a: record.get(a, []) for a in GRANT_ACTIONS}
    if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in lists.values()):
        return "grants are {pull, push, delete: [patterns], catalog: bool}"
    if not isinstance(record.get("catalog", False), bool):
        return "catalog is true or false"
    try:
        for action, patterns in lists.items():
            make_grants(**{action: patterns}, source=f"--{action}")
    except PolicyError as error:
        return str(error)
    return None


class UserStore:
    """Run-time users in ``DATA_DIR/auth``, combined with ``env_users`` into the htpasswd.

    Every change holds an flock on ``DATA_DIR/auth/.lock`` (threads of one process and
    separate processes alike) and ends with :meth:`sync_htpasswd`, so the registry sees a
    user as soon as ``add`` returns and stops accepting one as soon as ``remove`` returns
    (on its next request: it re-reads the file when the mtime changed).
    """

    def __init__(
        self,
        storage: Storage,
        htpasswd_path: Path,
        env_users: Mapping[str, Credential] | None = None,
        *,
        cost: int = DEFAULT_COST,
        saved: Callable[[], None] | None = None,
        followed_copy: Path | None = None,
    ) -> None:
        if not MIN_COST <= cost <= MAX_COST:
            raise AuthError(f"bcrypt cost {cost} is outside {MIN_COST}-{MAX_COST}")
        self.storage = storage
        # Derived from storage, never read back as the truth: the registry's own file.
        self.htpasswd_path = htpasswd_path
        self.env_users = dict(env_users or {})
        self.cost = cost
        # Called after every write of the users (a shared store: the others then read them).
        self._saved = saved
        # Hashes of the environment's plain passwords, made or verified once per process:
        # a new salt on every sync would rewrite the file (and reload the registry) each time.
        self._env_hashes: dict[str, str] = {}
        self._state_cache: tuple[bytes | None, _State] | None = None
        # A shared store (followed_copy given): logins read the users from memory, which
        # refresh() keeps current as the replicas' change record moves, never from the
        # store (a store that hangs must not hold up a login); followed_copy is the last
        # read, 0600, for a start while the store is down.
        self.followed_copy = followed_copy
        # refresh(): the stored users' version last written into the htpasswd file, and
        # the threads of this process writing that file one at a time.
        self._refreshed: str | None = None
        self._refreshed_once = False
        self._file_lock = threading.Lock()

    # -- operations --------------------------------------------------------------------------

    def add(
        self,
        name: str,
        password: str,
        *,
        generated: bool = False,
        grants: dict[str, Any] | None = None,
    ) -> bool:
        """Add a run-time user or replace its password; True when the user is new.

        ``generated``: the password came from :func:`generate_password` (hashed at
        :data:`GENERATED_COST`); only :meth:`add_generated` passes it. ``grants`` (as
        :meth:`set_grants` takes them) replace its run-time grants in the same write: a
        new user with grants is never stored without them, which would mean every action
        everywhere to a login (or another replica) reading in between.
        """
        if not valid_name(name):
            raise AuthError("a user name is 1-64 of A-Z a-z 0-9 . _ - characters")
        self._refuse_env_user(name, "change its password there")
        problem = _grants_problem(grants) if grants is not None else None
        if problem:
            raise AuthError(problem)
        cost = GENERATED_COST if generated else self.cost
        hashed = hash_password(password, cost)  # outside the lock: it takes a while
        with self._locked():
            state = self._load()
            created = name not in state.users
            state.users[name] = hashed
            if grants is not None:
                state.grants[name] = _stored_grants(grants)
            self._save(state)
            if name == INITIAL_ADMIN:
                self._forget_initial_password()
            self._sync()
        log.info("user %s %s", name, "added" if created else "given a new password")
        return created

    def add_generated(self, name: str, grants: dict[str, Any] | None = None) -> tuple[bool, str]:
        """Add a user or reset its password to a generated one: (created, the password).

        The password is generated here, not by the caller, so a cost-4 hash is only ever
        given to a password known to have 192 bits of entropy.
        """
        password = generate_password()
        return self.add(name, password, generated=True, grants=grants), password

    def set_grants(self, name: str, record: dict[str, Any]) -> None:
        """Replace ``name``'s run-time grants (token mode); ``record`` as :func:`grants_record`.

        Environment users may have run-time grants too: grants are not their password.
        """
        problem = _grants_problem(record)
        if problem:
            raise AuthError(problem)
        with self._locked():
            state = self._load()
            if name not in state.users and name not in self.env_users:
                raise AuthError(f"no user {name!r}")
            state.grants[name] = _stored_grants(record)
            self._save(state)
        log.info("user %s given run-time grants", name)

    def runtime_grants(self) -> dict[str, Any]:
        """name -> :class:`~.policy.Grants` set at run time; a cheap read, for every login."""
        from .policy import make_grants

        state = self._cached_state()
        return {
            name: make_grants(
                pull=g.get("pull", []),
                push=g.get("push", []),
                delete=g.get("delete", []),
                catalog=bool(g.get("catalog")),
            )
            for name, g in state.grants.items()
        }

    def password_hash(self, name: str) -> str | None:
        """``name``'s current bcrypt hash, or None for no such user; for the token service.

        Called at every login: the environment's plain passwords are hashed once per
        process (by :meth:`sync_htpasswd`, which the agent runs at start), the run-time
        users are a read of the stored file, never a bcrypt.
        """
        credential = self.env_users.get(name)
        if credential is not None:
            if credential.hashed:
                return credential.secret
            cached = self._env_hashes.get(name)
            if cached is not None:
                return cached
            try:
                with self._locked():
                    return self._env_hash(name, credential, {})
            except OSError:
                if self.followed_copy is None:
                    raise
                # Started with the store down: the htpasswd file holds the hash last made.
                return self._env_hash(name, credential, self._htpasswd_entries())
        return self._cached_state().users.get(name)

    def remove(self, name: str) -> None:
        self._refuse_env_user(name, "remove it there and restart")
        with self._locked():
            state = self._load()
            if name not in state.users:
                raise AuthError(f"no user {name!r}")
            del state.users[name]
            state.grants.pop(name, None)
            self._save(state)
            if name == INITIAL_ADMIN:
                self._forget_initial_password()
            self._sync()
        log.info("user %s removed", name)

    def list(self) -> dict[str, str]:
        """Every user, by name, with where it comes from: a variable name or ``run-time``."""
        with self._locked():
            state = self._load()
        origins = dict.fromkeys(state.users, RUNTIME)
        origins.update({name: cred.source for name, cred in self.env_users.items()})
        return dict(sorted(origins.items()))

    def sync_htpasswd(self) -> bool:
        """Write the htpasswd file if its content would change; True when it was written."""
        with self._locked():
            return self._sync()

    def refresh(self) -> bool:
        """Rewrite the htpasswd file when the stored users changed since the last look
        (another replica's ``user add``): one read, no lock. True when it was written."""
        # A conditional GET: unchanged users cost no body (and no decryption).
        if self._refreshed_once:
            changed, found = self.storage.load_if_changed(statekeys.USERS, self._refreshed)
            if not changed:
                return False
        else:
            found = self.storage.load(statekeys.USERS)
        raw = found.data if found is not None else None
        state = self._parse(raw)
        written = self._sync(state)
        if self.followed_copy is not None:
            self._remember(raw, state)
        self._refreshed = found.version if found is not None else None
        self._refreshed_once = True
        return written

    def ensure_initial_admin(self) -> str | None:
        """Create the first ``admin`` when nobody else can log in; a message to log, or None.

        The message names the password file and how to read it, never the password. It is
        also returned on later starts while that file still exists (a reminder), and when
        every user has been removed (every request is refused until one is added).
        """
        if self.env_users:
            return None
        path = self.storage.where(statekeys.INITIAL_ADMIN_PASSWORD)
        read_it = f"read it with: docker exec <container> cat {path}"
        with self._locked():
            state = self._load()
            if state.users:
                if INITIAL_ADMIN in state.users and self._initial_password() is not None:
                    return (
                        f"the initial password of user {INITIAL_ADMIN!r} is in {path}; {read_it} "
                        f"(`acme-registry user add {INITIAL_ADMIN}` sets a new one and deletes it)"
                    )
                return None
            if state.initial_admin:
                return (
                    "no registry users: every request is refused until one is added with "
                    "`acme-registry user add NAME`"
                )
            # A file without a user means a crash between the two writes below: the operator
            # may already have read that password, so it is the one to keep.
            password = self._initial_password()
            if password is None:
                password = generate_password()
                self.storage.store(statekeys.INITIAL_ADMIN_PASSWORD, password.encode() + b"\n")
            # Generated (or, after a crash, a file only this method writes): GENERATED_COST.
            state.users[INITIAL_ADMIN] = hash_password(password, GENERATED_COST)
            state.initial_admin = True
            self._save(state)
            self._sync()
        return (
            f"created registry user {INITIAL_ADMIN!r} with a random password, stored in {path}; "
            f"{read_it} (then log in with: docker login -u {INITIAL_ADMIN} --password-stdin)"
        )

    # -- internals -----------------------------------------------------------------------------

    def _refuse_env_user(self, name: str, advice: str) -> None:
        credential = self.env_users.get(name)
        if credential is not None:
            raise AuthError(
                f"user {name!r} is defined by {credential.source}, which the agent cannot "
                f"change at run time; {advice}"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self.storage.lock(statekeys.USERS_LOCK):
            yield

    def _cached_state(self) -> _State:
        """The stored state, parsed again only when its bytes changed (no lock: writes
        replace the file whole). A shared store that cannot be reached: the state last
        read (token mode's logins keep working, as the htpasswd file does)."""
        cached = self._state_cache
        if self.followed_copy is not None:
            return cached[1] if cached is not None else self._first_followed_state()
        try:
            raw = self.storage.load_bytes(statekeys.USERS)
        except OSError:
            if cached is None:
                raise
            return cached[1]
        if cached is not None and cached[0] == raw:
            return cached[1]
        state = self._parse(raw)
        self._state_cache = (raw, state)
        return state

    def _first_followed_state(self) -> _State:
        """A shared store, nothing read yet: the store, else the copy of the last read."""
        assert self.followed_copy is not None
        try:
            raw = self.storage.load_bytes(statekeys.USERS)
        except OSError:
            try:
                raw = self.followed_copy.read_bytes()
            except FileNotFoundError:
                raise OSError(
                    "the state store cannot be reached and no users were read before"
                ) from None
            state = self._parse(raw)
            self._state_cache = (raw, state)
            return state
        state = self._parse(raw)
        self._remember(raw, state)
        return state

    def _remember(self, raw: bytes | None, state: _State) -> None:
        """A shared store: ``state`` is what logins read now, and ``raw`` the copy's bytes."""
        previous = self._state_cache
        self._state_cache = (raw, state)
        if self.followed_copy is None or (previous is not None and previous[0] == raw):
            return
        try:
            if raw is None:
                self.followed_copy.unlink(missing_ok=True)
            else:
                write_atomic(self.followed_copy, raw)
        except OSError as error:  # the copy only serves a later start with the store down
            log.warning("could not keep a copy of the users in %s: %s", self.followed_copy, error)

    def _htpasswd_entries(self) -> dict[str, str]:
        try:
            return parse_htpasswd(self.htpasswd_path.read_text(errors="replace"))
        except FileNotFoundError:
            return {}

    def _load(self) -> _State:
        return self._parse(self.storage.load_bytes(statekeys.USERS))

    def _parse(self, raw: bytes | None) -> _State:
        where = self.storage.where(statekeys.USERS)
        if raw is None:
            return _State()
        try:
            data = json.loads(raw)
        except ValueError:
            raise AuthError(f"{where} is not valid JSON; restore it from a backup") from None
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, dict) or not all(
            isinstance(k, str) and valid_name(k) and isinstance(v, str) and is_bcrypt_hash(v)
            for k, v in users.items()
        ):
            # Refuse rather than drop users: a silently emptied store would lock people out.
            raise AuthError(f"{where} has an unexpected layout; restore it from a backup")
        grants = data.get("grants", {})
        if not isinstance(grants, dict) or not all(
            isinstance(k, str) and _grants_problem(v) is None for k, v in grants.items()
        ):
            raise AuthError(f"{where} has unexpected grants; restore it from a backup")
        return _State(
            users=dict(users), initial_admin=bool(data.get("initial_admin")), grants=grants
        )

    def _save(self, state: _State) -> None:
        data: dict[str, Any] = {"version": 1, "users": dict(sorted(state.users.items()))}
        if state.grants:
            data["grants"] = dict(sorted(state.grants.items()))
        if state.initial_admin:
            data["initial_admin"] = True
        raw = json_bytes(data)
        self.storage.store(statekeys.USERS, raw)
        if self.followed_copy is not None:
            # This replica's own change applies to its next login at once.
            self._remember(raw, state)
        if self._saved is not None:
            self._saved()

    def _initial_password(self) -> str | None:
        data = self.storage.load_bytes(statekeys.INITIAL_ADMIN_PASSWORD)
        password = data.decode(errors="replace").strip() if data is not None else ""
        return password if password and password_problem(password) is None else None

    def _forget_initial_password(self) -> None:
        self.storage.delete(statekeys.INITIAL_ADMIN_PASSWORD)

    def _env_hash(self, name: str, credential: Credential, current: Mapping[str, str]) -> str:
        if credential.hashed:
            return credential.secret
        cached = self._env_hashes.get(name)
        if cached is not None:
            return cached
        old = current.get(name)
        if old and hash_cost(old) == self.cost and check_password(credential.secret, old):
            hashed = old
        else:
            hashed = hash_password(credential.secret, self.cost)
        self._env_hashes[name] = hashed
        return hashed

    def _sync(self, state: _State | None = None) -> bool:
        with self._file_lock:
            return self._write_htpasswd(state or self._load())

    def _write_htpasswd(self, state: _State) -> bool:
        path = self.htpasswd_path
        try:
            old_bytes: bytes | None = path.read_bytes()
            old_mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            old_bytes, old_mtime = None, 0
        current = parse_htpasswd(old_bytes.decode(errors="replace")) if old_bytes else {}
        entries = dict(state.users)
        for name in sorted(set(entries) & set(self.env_users)):
            log.warning(
                "run-time user %s is shadowed by %s; the environment's password applies",
                name,
                self.env_users[name].source,
            )
        for name, credential in self.env_users.items():
            entries[name] = self._env_hash(name, credential, current)
        content = _HTPASSWD_HEADER + "".join(f"{n}:{h}\n" for n, h in sorted(entries.items()))
        data = content.encode()
        if data == old_bytes:
            return False
        ensure_private_dir(path.parent)
        write_atomic(path, data, mode=0o600)
        # The registry reloads only when the mtime differs from the one it saw, and file
        # times come from a coarse clock: two writes in one tick would look unchanged.
        stamp = max(time.time_ns(), old_mtime + 1_000)
        os.utime(path, ns=(stamp, stamp))
        log.info("htpasswd written with %d user(s)", len(entries))
        return True


# -- the control socket ----------------------------------------------------------------------

ControlHandler = Callable[[dict[str, Any]], dict[str, Any]]


def control_handlers(
    store: UserStore, describe_grants: Callable[[str], str] | None = None
) -> dict[str, ControlHandler]:
    """``user-add``, ``user-remove`` and ``user-list`` for :class:`~.control.ControlServer`.

    Requests: ``{"command": "user-add", "name": N, "password": P}`` (or ``"generate": true``
    instead of a password: the agent generates one and answers it as ``"password"``, the
    only answer holding one, for the CLI to show once), ``{"command": "user-remove", "name":
    N}``, ``{"command": "user-list"}``. Answers are ``{"ok": true, ...}`` or ``{"ok": false,
    "error": ...}``; no other answer contains a password, and none a hash.

    Token mode (``describe_grants`` given: a user's effective grants as one line):
    ``user-add`` may carry ``"grants"`` (:func:`grants_record`), which replace that user's
    run-time grants; without it they are kept. ``user-list`` answers ``"grants"``: name ->
    that line.
    """

    def answer(action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            return {"ok": True, **action()}
        except AuthError as error:
            return {"ok": False, "error": str(error)}
        except OSError as error:  # the state store is down (or DATA_DIR unwritable)
            return {
                "ok": False,
                "error": f"users cannot be read or changed now: the state store failed: {error}",
            }

    def add(request: dict[str, Any]) -> dict[str, Any]:
        name, password = request.get("name"), request.get("password")
        generate = password is None and request.get("generate") is True
        if not isinstance(name, str) or not (generate or isinstance(password, str)):
            return {"ok": False, "error": "user-add needs a name and a password"}
        grants = request.get("grants")

        def add_user() -> dict[str, Any]:
            # Grants checked before the password changes: a bad flag changes nothing.
            if grants is not None:
                if describe_grants is None:
                    raise AuthError("grants are only used with AUTH_MODE=token")
                problem = _grants_problem(grants)
                if problem:
                    raise AuthError(problem)
            result: dict[str, Any] = {}
            if generate:
                result["created"], result["password"] = store.add_generated(name, grants)
            else:
                result["created"] = store.add(name, str(password), grants=grants)
            return result

        return answer(add_user)

    def remove(request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("name")
        if not isinstance(name, str):
            return {"ok": False, "error": "user-remove needs a name"}

        def action() -> dict[str, Any]:
            store.remove(name)
            return {}

        return answer(action)

    def list_users(request: dict[str, Any]) -> dict[str, Any]:
        def listing() -> dict[str, Any]:
            users = store.list()
            if describe_grants is None:
                return {"users": users}
            return {"users": users, "grants": {name: describe_grants(name) for name in users}}

        return answer(listing)

    return {"user-add": add, "user-remove": remove, "user-list": list_users}
