"""``AUTH_MODE=token`` as the agent runs it: the token service, its keyring and the files.

The building blocks (:mod:`tokenservice`, :mod:`tokenhttp`, :mod:`tokens`, :mod:`policy`)
are wired here, so the agent only calls a few methods at the points of its loop:

- :meth:`TokenMode.registry_config`: the registry config keys of token mode, with the
  root bundle (``DATA_DIR/registry/token-roots.pem``) written first;
- :meth:`TokenMode.serve`: after every generation start or rotation (the served certificate
  may have changed): starts the token service on ``TOKEN_ADDR`` the first time, then moves
  it onto the new certificate (new connections get it; open ones keep theirs), and records
  that a registry runs with the bundle on disk;
- :func:`registry_key_reference`: whether tokens name their key by ``kid`` (registry 3.x,
  cheaper to check) or ``x5c`` (2.8), from the registry binary's ``--version``;
- :meth:`TokenMode.maintain`: the keyring's rollover, once per loop step: a new bundle is
  written and a generation started with it (``rotate``) before the new key signs;
- :meth:`TokenMode.internal_token`: retention's own bearer token for one repository,
  minted in the agent with the keyring, never through the token service.

With a shared store (``shared`` given, ``STATE_STORE=s3``) the keyring is the store's
:data:`statekeys.TOKEN_KEYRING` (sealed by the store's encryption), created and changed
only by conditional writes (:class:`~.tokens.StorageBlob`), so every replica signs with
the same key and checks the others' refresh tokens. :meth:`TokenMode.maintain` then first
follows the stored keyring (a conditional GET per poll), and the "registry trusts this
bundle" mark is this replica's own, kept in memory: the switch to the next key waits for
it and for the grace of :mod:`tokenrollover`. ``DATA_DIR/token/keyring.json`` is a copy,
for a start while the store is down.

Users and grants are re-read at every token request: passwords and run-time grants through
the :class:`~.auth.UserStore`, the policy file by its mtime. A policy file that became
invalid at run time keeps the last valid one in force (logged): an empty policy would give
every user every action.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import activation, statechanges, statekeys, tokenconfig
from .admin import Metrics
from .auth import UserStore
from .policy import EMPTY_POLICY, Grants, Policy, PolicyError, effective_grants, parse_policy
from .storage import Storage, write_atomic
from .tokenconfig import TokenSettings
from .tokenhttp import ServerCertificate, ThreadedServer, TokenHTTPServer
from .tokens import (
    FileBlob,
    KeyReference,
    Keyring,
    SecretBlob,
    StorageBlob,
    TokenError,
    access_claims,
    key_reference_for,
    load_keyring,
    update_keyring,
)
from .tokenservice import Hooks, PasswordChecker, TokenService

log = logging.getLogger(__name__)

KEYRING_FILE = Path("token") / "keyring.json"
BUNDLE_FILE = Path("registry") / "token-roots.pem"
# Who retention's deletes are made as, in the registry's log (auth.user.name). The space
# keeps it out of the user names (names.USER_NAME): no login can ever be this subject.
INTERNAL_SUBJECT = "acme-registry retention"
# Each token is minted for one request and checked when that request arrives: a minute is
# ample, and a token that leaked anyhow would be useless soon after.
INTERNAL_TOKEN_TTL = dt.timedelta(seconds=60)
# What retention does to a repository: HEAD a tag (pull), DELETE a manifest or tag (delete).
RETENTION_ACTIONS = ("pull", "delete")


def registry_key_reference(binary: Path) -> KeyReference:
    """How tokens name their key for ``binary``, from its ``--version`` (x5c when unknown)."""
    version = activation.parse_version(activation.binary_version(str(binary)))
    return key_reference_for(version.major if version is not None else None)


class PolicyFile:
    """``AUTH_POLICY_FILE`` parsed again whenever its mtime or size changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._policy = EMPTY_POLICY
        if path is not None:
            # At start it was checked by config: an error now is a race; fail loudly.
            self._policy = parse_policy(path.read_text(), str(path))
            self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def policy(self) -> Policy:
        if self.path is None:
            return EMPTY_POLICY
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return self._policy
        self._stamp = stamp
        try:
            self._policy = parse_policy(self.path.read_text(), str(self.path))
            log.info("policy file %s read again", self.path)
        except (OSError, UnicodeDecodeError, PolicyError) as error:
            log.error("policy file %s: %s; the last valid one stays in force", self.path, error)
        return self._policy


class TokenMode:
    def __init__(
        self,
        settings: TokenSettings,
        data_dir: Path,
        users: UserStore,
        metrics: Metrics,
        now: dt.datetime,
        key_reference: KeyReference = KeyReference.X5C,
        shared: Storage | None = None,
    ) -> None:
        """``key_reference``: how tokens name their key, for the registry binary in use
        (:func:`~.tokens.key_reference_for` its major version). ``shared``: the state store
        several replicas share (``STATE_STORE=s3``), which then holds the keyring.

        OSError when the shared store cannot be reached and no copy is in DATA_DIR.
        """
        self.settings = settings
        self.users = users
        self.shared = shared is not None
        self.times = settings.keyring_times if self.shared else settings.keyring_times.single()
        self.cache = FileBlob(data_dir / KEYRING_FILE)
        self.stored: StorageBlob | None = (
            # Each write replaces the change record: the others read the keyring again.
            StorageBlob(shared, statekeys.TOKEN_KEYRING, lambda: statechanges.bump(shared))
            if shared is not None
            else None
        )
        self.blob: SecretBlob = self.stored or self.cache
        # Shared store: the bundle digest this replica's registry runs with (each replica
        # has its own; the keyring's served_bundle is a single instance's).
        self.served_here = ""
        self.keyring: Keyring = self._load(now)
        self.bundle_path = data_dir / BUNDLE_FILE
        self.policy_file = PolicyFile(settings.policy_file)
        self._written_digest: str | None = None
        self.certificate: ServerCertificate | None = None
        self.server: ThreadedServer | None = None
        self.service = TokenService(
            service=settings.service,
            issuer=settings.issuer,
            ttl=settings.ttl,
            password_hash=users.password_hash,
            grants=self.grants,
            keyring=lambda: self.keyring,  # replaced by maintain(): read at every token
            checker=PasswordChecker(),
            hooks=Hooks(failure=metrics.auth_failure, issued=metrics.token_issued),
            key_reference=key_reference,
            refresh_binding=self.refresh_binding if self.shared else None,
        )

    def _load(self, now: dt.datetime) -> Keyring:
        if self.stored is None:
            return load_keyring(self.blob, now, self.times)
        # A keyring in DATA_DIR and none in the store: a single instance becoming replicas.
        # Its key goes on signing (with its refresh tokens) instead of a new one.
        seed = self._cached_copy()
        try:
            ring = load_keyring(self.stored, now, self.times, self.served_here, seed)
        except OSError:
            if seed is None:
                raise
            log.warning("the state store is unreachable: signing with the cached keyring")
            if seed.current.not_after <= now:
                # Tokens its expired certificate signs are refused anyway: a fresh key, in
                # memory only, until the store answers and its keyring is followed.
                return seed.advance(now, times=self.times, served=self.served_here)
            return seed
        self._keep_copy(ring)
        return ring

    def _cached_copy(self) -> Keyring | None:
        data = self.cache.load()
        if data is None:
            return None
        try:
            return replace(Keyring.from_bytes(data), served_bundle="")
        except TokenError as error:
            log.error("%s: %s; not used", self.cache.path, error)
            return None

    def _keep_copy(self, ring: Keyring) -> None:
        if self.stored is not None and self.cache.load() != ring.to_bytes():
            self.cache.store(ring.to_bytes())

    # -- grants ------------------------------------------------------------------------

    def grants(self, user: str | None) -> Grants:
        return effective_grants(
            user,
            self.policy_file.policy(),
            self.users.runtime_grants(),
            self.settings.anonymous_pull,
        )

    def refresh_binding(self, name: str) -> str | None:
        """Shared store: what a refresh token binds ``name`` to, the same on every replica.

        A password from AUTH_USERS is hashed by each replica with its own salt, so its hash
        differs between replicas: such a user is bound to a digest of the password keyed
        with the keyring's refresh secret (a changed password still invalidates the token;
        the digest in a token tells nothing without the secret). Everyone else: the hash,
        stored in the shared store or given in the environment, the same everywhere.
        """
        credential = self.users.env_users.get(name)
        if credential is not None and not credential.hashed:
            keyed = hmac.new(
                self.keyring.refresh_secret,
                b"acme-registry env password\0" + f"{name}\0{credential.secret}".encode(),
                hashlib.sha256,
            )
            return f"env:{keyed.hexdigest()}"
        return self.users.password_hash(name)

    def describe_grants(self, user: str) -> str:
        """One line for ``user list``: the user's effective grants."""
        return self.grants(user).describe()

    def internal_token(self, repository: str, now: dt.datetime) -> str:
        """A bearer token for retention's API calls on ``repository``: exactly
        ``repository:<repository>:pull,delete``, :data:`INTERNAL_TOKEN_TTL`, signed with the
        current key as the token service signs. It never passes through the token service
        (no password, no user, not counted as issued) and must never be logged."""
        claims = access_claims(
            issuer=self.settings.issuer,
            subject=INTERNAL_SUBJECT,
            audience=self.settings.service,
            access=[{"type": "repository", "name": repository, "actions": [*RETENTION_ACTIONS]}],
            now=now,
            ttl=INTERNAL_TOKEN_TTL,
        )
        return self.keyring.current.sign(claims, self.service.key_reference)

    # -- the registry ------------------------------------------------------------------

    def registry_config(self, now: dt.datetime) -> dict[str, Any]:
        self.write_bundle(now)
        return tokenconfig.registry_token_config(self.settings, self.bundle_path)

    def write_bundle(self, now: dt.datetime) -> None:
        """The certificates the registry trusts; read by every generation started later."""
        pem = self.keyring.bundle_pem(now)
        self.bundle_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.bundle_path.exists() or self.bundle_path.read_bytes() != pem:
            write_atomic(self.bundle_path, pem, mode=0o644)
        self._written_digest = self.keyring.bundle_digest(now)

    def serve(self, tls_file: Path) -> None:
        """A generation started (or rotated) with ``tls_file``: follow it.

        Raises OSError naming TOKEN_ADDR when the service cannot listen.
        """
        self._generation_started()
        if self.certificate is None:
            self.certificate = ServerCertificate(tls_file)
        elif self.server is not None:
            self.certificate.load(tls_file)
            log.info("token service moved onto the new certificate")
        if self.server is None:
            self.server = self._start_server(self.certificate)

    @property
    def failed_to_listen(self) -> bool:
        """A certificate to serve, and no server: the last start failed."""
        return self.certificate is not None and self.server is None

    def _start_server(self, certificate: ServerCertificate) -> ThreadedServer:
        from .launcher import bind_problem  # launcher imports the agent, which imports us

        addr = self.settings.addr
        http = TokenHTTPServer(
            self.service.handle, certificate, proxy_protocol=self.settings.proxy_protocol
        )
        try:
            server = ThreadedServer(http, addr.host, addr.port).start()
        except OSError as error:
            raise OSError(bind_problem("TOKEN_ADDR", addr.port, error)) from None
        log.info(
            "token service on %s (realm %s, tokens name their key by %s)",
            ", ".join(f"{h}:{p}" for h, p in server.addresses) or f"port {addr.port}",
            self.settings.realm,
            self.service.key_reference,
        )
        return server

    def _generation_started(self) -> None:
        written = self._written_digest
        if written is None or written == self._served():
            return
        if self.stored is not None:
            self.served_here = written
            return
        self.keyring = update_keyring(
            self.blob, lambda stored: (stored or self.keyring).mark_served(written)
        )

    def _served(self) -> str:
        """The bundle digest the registry runs with: this replica's, or (one instance)
        the one the keyring records."""
        return self.served_here if self.stored is not None else self.keyring.served_bundle

    # -- the keyring's rollover --------------------------------------------------------

    def follow(self) -> bool:
        """Shared store: take the stored keyring when another replica changed it (one
        conditional GET); True when it changed. OSError when the store is unreachable."""
        if self.stored is None:
            return False
        changed, data = self.stored.load_if_changed()
        if not changed:
            return False
        if data is None:
            # Removed from the store: put ours back (or take one a replica just made).
            ring = update_keyring(self.stored, lambda stored: stored or self.keyring)
        else:
            ring = Keyring.from_bytes(data)
        self._adopt(ring, "read from the shared store")
        return True

    def _adopt(self, ring: Keyring, how: str) -> None:
        if ring.to_bytes() == self.keyring.to_bytes():
            self.keyring = ring
            return
        self.keyring = ring
        self._keep_copy(ring)
        log.info(
            "token signing keyring %s (signing key valid until %s%s)",
            how,
            ring.current.not_after,
            ", a next key published" if ring.next is not None else "",
        )

    def maintain(self, now: dt.datetime, rotate: Callable[[], bool], look: bool = True) -> None:
        """Advance the keyring; ``rotate`` starts a registry generation and says whether it
        did (False: none runs yet, and the first one will read the bundle written here).

        Shared store: the stored keyring is followed first when ``look`` (the change record
        moved), and a change is written only on the version read (re-read and redone on a
        conflict). OSError when the store cannot be reached (the keyring in memory keeps
        signing)."""
        if look:
            self.follow()
        served = self.served_here if self.stored is not None else None
        if self.keyring.advance(now, times=self.times, served=served) is not self.keyring:
            ring = update_keyring(
                self.blob,
                lambda stored: (stored or self.keyring).advance(
                    now, times=self.times, served=served
                ),
            )
            self._adopt(ring, "advanced")
        ring = self.keyring
        if ring.bundle_digest(now) == self._served():
            return
        self.write_bundle(now)
        if rotate():
            log.info("a registry generation now trusts the new token certificate")
            self._generation_started()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.service.checker.close()
