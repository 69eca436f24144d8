"""One order from new-order to chain, read top to bottom in :meth:`Issuer.obtain`.

The acme library does the protocol; this module adds what it lacks for unattended use:
short polling that honours Retry-After (the library sleeps a fixed second, a ~2 s floor
per issuance), retries of badNonce beyond the library's one, and retries of transient
network and 5xx errors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import josepy as jose
import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import errors, messages
from cryptography import x509

from . import (
    __version__,
    dnschallenge,
    dnspersist,
    issued,
    keys,
    schedule,
    sharedcert,
    statekeys,
)
from .account import ACCOUNT_ALG, Account
from .certstore import CertificatePair, CertStore, parse_pair
from .challenges import PendingChallenges
from .config import ConfigError, Settings
from .dnsconfig import DNS_01, DNS_PERSIST_01
from .dnspropagation import PropagationChecker
from .dnsproviders import DnsError, DnsProvider, provider_for
from .names import is_ip
from .outcome import FailureReason, IssuanceResult, problem_code, reason_for_problem
from .statestore import open_storage
from .storage import FileStorage, Lock, LockTimeout, Storage, StorageConflict

log = logging.getLogger(__name__)

T = TypeVar("T")

ORDER_TIMEOUT = 180.0
NETWORK_TIMEOUT = 30
BAD_NONCE_RETRIES = 10
TRANSIENT_RETRIES = 4
POLL_FIRST = 0.05
POLL_MAX = 2.0
# A shared store: how long an orderer waits for another's lock (the agent gives the child
# sources.ISSUANCE_TIMEOUT in all, and the order itself may take ORDER_TIMEOUT).
LOCK_WAIT = 90.0


class IssuanceError(Exception):
    """An order failed; ``str()`` is one line naming the step and the CA's reason.

    ``reason`` is set where the failure is known; ``problem`` is the ACME problem code
    (``rateLimited``, ``unauthorized``, ...) when the CA sent a problem document;
    ``retry_after`` is when the CA asked us to come back (aware UTC), if it said so.
    """

    def __init__(
        self,
        message: str,
        reason: FailureReason,
        retry_after: dt.datetime | None = None,
        problem: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.problem = problem


class NewOrder(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces``, which the acme library lacks."""

    replaces: str | None = jose.field("replaces", omitempty=True)


class Network(acme_client.ClientNetwork):
    """Remembers the last response, for the Retry-After of a refused request."""

    last_response: requests.Response | None = None

    def _send_request(
        self, method: str, url: str, *args: object, **kwargs: object
    ) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_response = response
        return response


SHORTLIVED = "shortlived"


def choose_profile(
    offered: dict[str, str] | None, wanted: str | None, has_ip: bool = False
) -> str | None:
    """The profile to send: the configured one, else the CA's standard one when it lists any.

    A CA that lists profiles may pick one at random for an order that names none. With an
    IP address among the names and no ACME_PROFILE, ``shortlived``: Let's Encrypt issues
    IP-address certificates only under it.
    """
    if has_ip and not wanted:
        if offered and SHORTLIVED in offered:
            return SHORTLIVED
        listed = ", ".join(sorted(offered)) if offered else "none"
        raise IssuanceError(
            f"ACME_PROFILE: an IP address certificate needs the {SHORTLIVED!r} profile, which "
            f"the CA does not offer (it offers: {listed}); set ACME_PROFILE",
            FailureReason.CA_ERROR,
        )
    if not offered:
        if wanted:
            raise IssuanceError(
                f"ACME_PROFILE: the CA offers no profiles, not even {wanted!r}",
                FailureReason.CA_ERROR,
            )
        return None
    if wanted:
        if wanted not in offered:
            raise IssuanceError(
                f"ACME_PROFILE: {wanted!r} is not offered by the CA "
                f"(it offers: {', '.join(sorted(offered))})",
                FailureReason.CA_ERROR,
            )
        return wanted
    for standard in ("classic", "default"):
        if standard in offered:
            return standard
    return None


class Issuer:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        account: Account,
        challenges: PendingChallenges,
        lost: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.account = account
        self.challenges = challenges
        # Set when the issuance lock is no longer ours (a shared store): stop ordering.
        self.lost = lost
        self.net: Network | None = None
        self._dns_provider: DnsProvider | None = None
        # (step, seconds) of every request, for the agent's ACME latency metric.
        self.timings: list[tuple[str, float]] = []

    def obtain(self, replaces: str | None = None) -> CertificatePair:
        """Place one order for every configured name and return the issued pair.

        ``replaces`` is the ARI certificate ID of the certificate this one renews.
        """
        deadline = time.monotonic() + ORDER_TIMEOUT
        client = self._client()
        self._ensure_account(client)
        self._cleanup_left_dns01_records()
        resumed = self._resume_pending(client, deadline)
        if resumed is not None:
            return resumed

        profile = choose_profile(
            client.directory.meta.profiles,
            self.settings.profile,
            has_ip=bool(self.settings.ip_addresses),
        )
        if not _offers_ari(client.directory):
            replaces = None  # RFC 9773 5: only to a CA that advertises ARI
        key = keys.generate_key(self.settings.key_type)
        csr = keys.make_csr(key, self.settings.domains)
        order = self._new_order(client, csr, profile, replaces)
        log.info("order placed for %s: %s", ", ".join(self.settings.domains), order.uri)

        answered: list[str] = []
        records: list[dnschallenge.Dns01Record] = []
        try:
            if self.settings.challenge == DNS_01:
                records = self._answer_dns01(client, order.authorizations)
            elif self.settings.challenge == DNS_PERSIST_01:
                self._answer_dns_persist01(client, order.authorizations)
            else:
                for authz in order.authorizations:
                    if authz.body.status == messages.STATUS_VALID:
                        continue
                    answered.append(self._answer_http01(client, authz))
            for authz in order.authorizations:
                self._wait_authorization(client, authz, deadline)
        finally:
            for token in answered:
                self.challenges.remove(token)
            self.challenges.finish()
            if records:
                self._cleanup_dns01(records)

        # Recorded before finalizing: an agent killed after this point picks up the
        # issued certificate on its next start instead of placing another order.
        self._check_lock()
        self._remember_pending(order.uri, key)
        return self._complete(client, order.uri, key, csr, deadline)

    def _check_lock(self) -> None:
        if self.lost is not None and self.lost.is_set():
            raise IssuanceError(
                "the issuance lock was lost (another replica took it over); stopping this order",
                FailureReason.STORAGE,
            )

    def _new_order(
        self,
        client: acme_client.ClientV2,
        csr: bytes,
        profile: str | None,
        replaces: str | None,
    ) -> messages.OrderResource:
        identifiers = [
            messages.Identifier(
                typ=messages.IDENTIFIER_IP if is_ip(name) else messages.IDENTIFIER_FQDN,
                value=name,
            )
            for name in self.settings.domains
        ]
        request = NewOrder(identifiers=identifiers, profile=profile, replaces=replaces)
        try:
            response = self._call(
                "new order", partial(client._post, client.directory["newOrder"], request), client
            )
        except IssuanceError as error:
            if replaces is None:
                raise
            # The old certificate may belong to another account, be unknown to this CA,
            # or be replaced already: RFC 9773 lets the CA refuse; order plainly instead.
            log.warning(
                "the CA refused to mark %s as replaced (%s); ordering without it", replaces, error
            )
            return self._new_order(client, csr, profile, None)
        body = messages.Order.from_json(response.json())
        authorizations = [
            client._authzr_from_response(
                self._call("fetch authorization", partial(client._post_as_get, url), client),
                uri=url,
            )
            for url in body.authorizations
        ]
        if replaces:
            log.info("renewal order replaces %s", replaces)
        return messages.OrderResource(
            body=body,
            uri=response.headers.get("Location"),
            authorizations=authorizations,
            csr_pem=csr,
        )

    def _remember_pending(self, order_url: str, key: keys.PrivateKey) -> None:
        self.storage.store_json(
            statekeys.PENDING_ORDER,
            {
                "url": order_url,
                "directory": self.settings.directory,
                "names": list(self.settings.domains),
                "key": keys.key_to_pem(key).decode(),
            },
        )

    def _resume_pending(
        self, client: acme_client.ClientV2, deadline: float
    ) -> CertificatePair | None:
        """Finish an order an earlier process finalized but did not see through."""
        pending = self.storage.load_json(statekeys.PENDING_ORDER)
        if not pending:
            return None
        self.storage.delete(statekeys.PENDING_ORDER)
        if pending.get("directory") != self.settings.directory or pending.get("names") != list(
            self.settings.domains
        ):
            return None
        log.info("resuming the order %s left by an earlier run", pending["url"])
        try:
            key = keys.load_key(pending["key"].encode())
            csr = keys.make_csr(key, self.settings.domains)
            self._remember_pending(pending["url"], key)
            return self._complete(client, pending["url"], key, csr, deadline)
        except (IssuanceError, ValueError, KeyError) as error:
            log.warning("the earlier order cannot be completed (%s); placing a new one", error)
            self.storage.delete(statekeys.PENDING_ORDER)
            return None

    def _complete(
        self,
        client: acme_client.ClientV2,
        order_url: str,
        key: keys.PrivateKey,
        csr: bytes,
        deadline: float,
    ) -> CertificatePair:
        chain = self._finalize(client, order_url, csr, deadline)
        pair = parse_pair(chain.encode(), keys.key_to_pem(key))
        self.storage.delete(statekeys.PENDING_ORDER)
        log.info("certificate issued: %s", pair.describe())
        return pair

    def _client(self) -> acme_client.ClientV2:
        net = self.net = self._network(self.account.key())
        return acme_client.ClientV2(self._directory(net), net)

    def directory_meta(self) -> dict[str, Any]:
        """The directory's ``meta``, fetched with no account key (so none is made)."""
        return dict(self._directory(self._network(None)).meta.to_partial_json())

    def _network(self, key: jose.JWK | None) -> Network:
        verify: str | bool = str(self.settings.ca_bundle) if self.settings.ca_bundle else True
        return Network(
            key=key,
            alg=ACCOUNT_ALG,
            verify_ssl=verify,  # type: ignore[arg-type]  # requests takes a bundle path too
            user_agent=f"acme-registry/{__version__} acme-python",
            timeout=NETWORK_TIMEOUT,
        )

    def _directory(self, net: Network) -> messages.Directory:
        return self._retry(
            "directory", lambda: acme_client.ClientV2.get_directory(self.settings.directory, net)
        )

    def _ensure_account(self, client: acme_client.ClientV2) -> None:
        regr = self.account.registration()
        if regr is None:
            self._retry("account registration", lambda: self.account.register(client))
        else:
            client.net.account = regr

    def _answer_http01(
        self, client: acme_client.ClientV2, authz: messages.AuthorizationResource
    ) -> str:
        name = authz.body.identifier.value
        for challb in authz.body.challenges:
            if isinstance(challb.chall, acme_challenges.HTTP01):
                response, validation = challb.response_and_validation(client.net.key)
                token = challb.chall.encode("token")
                self.challenges.add(token, validation)
                self._call(
                    "answer challenge", partial(client.answer_challenge, challb, response), client
                )
                log.info("answered the HTTP-01 challenge for %s", name)
                return token
        raise IssuanceError(
            f"the CA offers no HTTP-01 challenge for {name}", FailureReason.VALIDATION
        )

    # -- DNS challenges ----------------------------------------------------------------

    def _provider(self) -> DnsProvider:
        if self._dns_provider is None:
            dns = self.settings.dns
            if dns is None or dns.provider is None:
                raise IssuanceError("DNS_PROVIDER: not configured", FailureReason.DNS)
            self._dns_provider = provider_for(dns.provider, dns.propagation.resolvers)
        return self._dns_provider

    def _answer_dns01(
        self,
        client: acme_client.ClientV2,
        authorizations: list[messages.AuthorizationResource],
    ) -> list[dnschallenge.Dns01Record]:
        """Add every record, wait until it is visible, then answer the challenges.

        The records are saved before they are added, so that a process killed between
        here and the cleanup leaves nothing behind once the next one starts.
        """
        assert self.settings.dns is not None
        account_key = client.net.key
        assert account_key is not None
        try:
            records = dnschallenge.dns01_records(authorizations, account_key)
            self.storage.store_json(
                statekeys.DNS01_RECORDS, {"records": [r.to_state() for r in records]}
            )
            dnschallenge.present_all(self._provider(), records)
        except DnsError as error:
            self.storage.delete(statekeys.DNS01_RECORDS)
            raise IssuanceError(str(error), FailureReason.DNS) from None
        try:
            PropagationChecker(self.settings.dns.propagation).wait_visible(
                dnschallenge.wanted(records)
            )
        except DnsError as error:
            self._cleanup_dns01(records)
            raise IssuanceError(str(error), FailureReason.DNS) from None
        log.info(
            "TXT records in place (DNS_PROPAGATION_CHECK=%s): %s",
            self.settings.dns.propagation.check,
            ", ".join(sorted(dnschallenge.wanted(records))),
        )
        try:
            for record in records:
                response = dnschallenge.answer(record, account_key)
                assert record.challenge is not None
                self._call(
                    "answer challenge",
                    partial(client.answer_challenge, record.challenge, response),
                    client,
                )
                log.info("answered the DNS-01 challenge for %s", record.identifier)
        except BaseException:
            self._cleanup_dns01(records)
            raise
        return records

    def _cleanup_dns01(self, records: list[dnschallenge.Dns01Record]) -> None:
        """Remove the records, best effort: a failure is logged, never hides the outcome."""
        try:
            provider = self._provider()
        except IssuanceError as error:
            log.warning("cannot remove the TXT records: %s", error)
            return
        for failure_ in dnschallenge.cleanup_all(provider, records):
            log.warning("TXT record not removed: %s", failure_)
        self.storage.delete(statekeys.DNS01_RECORDS)

    def _cleanup_left_dns01_records(self) -> None:
        """Remove the records an earlier process added and did not remove (it crashed)."""
        saved = self.storage.load_json(statekeys.DNS01_RECORDS)
        if not saved:
            return
        try:
            records = [dnschallenge.record_from_state(r) for r in saved.get("records", [])]
        except (KeyError, TypeError):
            self.storage.delete(statekeys.DNS01_RECORDS)
            return
        if self.settings.challenge != DNS_01:
            log.warning(
                "TXT records left by an earlier dns-01 order cannot be removed without "
                "DNS_PROVIDER: %s",
                ", ".join(f"{r.fqdn} {r.value}" for r in records),
            )
            self.storage.delete(statekeys.DNS01_RECORDS)
            return
        log.info("removing %d TXT record(s) left by an earlier run", len(records))
        self._cleanup_dns01(records)

    def _answer_dns_persist01(
        self,
        client: acme_client.ClientV2,
        authorizations: list[messages.AuthorizationResource],
    ) -> None:
        assert self.settings.dns is not None
        meta = client.directory.meta.to_partial_json()
        try:
            issuer = dnspersist.choose_issuer(meta, self.settings.dns.persist_issuer)
            found = dnschallenge.persist_challenges(authorizations, issuer)
        except (DnsError, ConfigError) as error:
            raise IssuanceError(str(error), FailureReason.DNS) from None
        for persist in found:
            self._call(
                "answer challenge",
                partial(
                    client.answer_challenge, persist.challenge, dnschallenge.DnsPersist01Response()
                ),
                client,
            )
            log.info("answered the DNS-PERSIST-01 challenge for %s", persist.identifier)

    def _wait_authorization(
        self,
        client: acme_client.ClientV2,
        authz: messages.AuthorizationResource,
        deadline: float,
    ) -> None:
        name = authz.body.identifier.value
        pause = POLL_FIRST
        while True:
            self._check_lock()
            authz, response = self._call("poll authorization", partial(client.poll, authz), client)
            status = authz.body.status
            if status == messages.STATUS_VALID:
                return
            if status != messages.STATUS_PENDING:
                problem = _challenge_problem(authz)
                raise IssuanceError(
                    f"validation of {name} failed: "
                    f"{_describe(problem) if problem else f'authorization is {status}'}",
                    reason_for_problem(problem.typ if problem else None, validating=True),
                )
            pause = _sleep_before_poll(
                response, pause, deadline, f"validation of {name}", FailureReason.VALIDATION
            )

    def _finalize(
        self, client: acme_client.ClientV2, order_url: str, csr: bytes, deadline: float
    ) -> str:
        """Finalize the order when it is ready and return the chain once it is valid."""
        pause = POLL_FIRST
        finalized = False
        while True:
            self._check_lock()
            response = self._call("poll order", partial(client._post_as_get, order_url), client)
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_INVALID:
                why = _describe(body.error) if body.error else "no reason given"
                raise IssuanceError(
                    f"the CA refused the order: {why}",
                    reason_for_problem(body.error.typ if body.error else None),
                )
            if body.status == messages.STATUS_VALID and body.certificate:
                chain = self._call(
                    "download certificate", partial(client._post_as_get, body.certificate), client
                )
                return chain.text
            if body.status == messages.STATUS_READY and not finalized:
                request = messages.CertificateRequest(csr=x509.load_pem_x509_csr(csr))
                self._call("finalize", partial(client._post, body.finalize, request), client)
                finalized = True
                continue
            if body.status == messages.STATUS_PENDING:
                raise IssuanceError(
                    "the order's authorizations are not valid", FailureReason.VALIDATION
                )
            pause = _sleep_before_poll(
                response, pause, deadline, "the order", FailureReason.CA_ERROR
            )

    def _call(self, step: str, action: Callable[[], T], client: acme_client.ClientV2) -> T:
        """Run an account-authenticated step, registering again if the CA forgot us."""
        try:
            return self._retry(step, action)
        except IssuanceError as error:
            if error.problem not in ("accountDoesNotExist", "unauthorized"):
                raise
        log.warning("the CA no longer knows the stored account; registering again")
        self.account.forget()
        self._retry("account registration", lambda: self.account.register(client))
        return self._retry(step, action)

    def _retry_after(self) -> dt.datetime | None:
        response = self.net.last_response if self.net else None
        if response is None:
            return None
        return schedule.retry_after_at(response.headers.get("Retry-After"), dt.datetime.now(dt.UTC))

    def _retry(self, step: str, action: Callable[[], T]) -> T:
        bad_nonces = transient = 0
        while True:
            started = time.monotonic()
            try:
                result = action()
                self.timings.append((step, time.monotonic() - started))
                return result
            except messages.Error as error:
                self.timings.append((step, time.monotonic() - started))
                if error.code == "badNonce" and bad_nonces < BAD_NONCE_RETRIES:
                    bad_nonces += 1
                    continue
                if _is_transient(error) and transient < TRANSIENT_RETRIES:
                    transient += 1
                    time.sleep(0.25 * 2**transient)
                    continue
                raise failure(step, error, self._retry_after()) from None
            except errors.ConflictError as error:
                raise failure(step, error) from None
            except (requests.ConnectionError, requests.Timeout, errors.ClientError) as error:
                if transient < TRANSIENT_RETRIES and not _is_client_side(error):
                    transient += 1
                    log.warning("%s: %s; retrying", step, _short(error))
                    time.sleep(0.25 * 2**transient)
                    continue
                raise failure(step, error) from None


def failure(step: str, error: Exception, retry_after: dt.datetime | None = None) -> IssuanceError:
    """The IssuanceError for a request of ``step`` that failed with ``error``.

    The reason comes from what is known here: the problem document's type, else the
    exception's class (no answer at all is the network; an HTTP error status is the CA's).
    """
    if isinstance(error, messages.Error):
        return IssuanceError(
            f"{step}: {_describe(error)}",
            reason_for_problem(error.typ),
            retry_after,
            problem_code(error.typ) or None,
        )
    if isinstance(error, errors.ConflictError):
        # A 409 (alreadyReplaced, for one): the library keeps no problem document.
        return IssuanceError(f"{step}: the CA answered 409 Conflict", FailureReason.CA_ERROR)
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return IssuanceError(f"{step}: {_short(error)}", FailureReason.NETWORK, retry_after)
    return IssuanceError(f"{step}: {_short(error)}", FailureReason.CA_ERROR, retry_after)


def _sleep_before_poll(
    response: requests.Response,
    pause: float,
    deadline: float,
    what: str,
    reason: FailureReason,
) -> float:
    """Sleep before the next poll: Retry-After when the CA gives one, else a short backoff.

    ``reason`` is what running out of time means here (a validation that never ends, or
    a CA that never finishes the order).
    """
    wait = pause
    header = response.headers.get("Retry-After")
    if header:
        now = dt.datetime.now(dt.UTC)
        when = schedule.retry_after_at(header, now) or now + dt.timedelta(seconds=1)
        wait = max(0.0, (when - now).total_seconds())
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise IssuanceError(f"timed out waiting for {what}", reason)
    time.sleep(min(wait, remaining))
    return min(pause * 2, POLL_MAX)


def _offers_ari(directory: messages.Directory) -> bool:
    try:
        directory["renewalInfo"]
    except KeyError:
        return False
    return True


def _challenge_problem(authz: messages.AuthorizationResource) -> messages.Error | None:
    for challb in authz.body.challenges:
        if challb.error is not None:
            return challb.error
    return None


def _describe(error: messages.Error) -> str:
    code = error.code or (error.typ or "error").rsplit(":", 1)[-1]
    return f"{code}: {error.detail}" if error.detail else code


def _is_transient(error: messages.Error) -> bool:
    return error.code in ("serverInternal",)


def _is_client_side(error: Exception) -> bool:
    response = error.args[0] if error.args else None
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and status < 500


def _short(error: Exception) -> str:
    response = error.args[0] if error.args else None
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return f"HTTP {status} from {getattr(response, 'url', 'the CA')}"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def run(
    settings: Settings,
    replaces: str | None = None,
    dry_run: bool = False,
    record_version: str | None = None,
    agent_started: float | None = None,
) -> IssuanceResult:
    """The issuing child process: one order, then (a step of its own) storing what it got.

    A dry run orders from the dry-run directory and stores nothing. The result always
    comes back, whatever failed: the agent counts it and backs off by its reason.

    With a shared store (several replicas): the issuance lock is held with a lease, renewed
    by the lock's own thread; under it the certificate record is read first, and when it is
    no longer at ``record_version`` (the version the agent saw; "" for none) another replica
    has committed meanwhile: that certificate is taken, and no order is placed. The record
    is read every poll interval while the lock is awaited too (:func:`_lock_or_committed`),
    so a certificate committed by a holder that keeps its lock is served at once. A new
    certificate is committed only if the record is still as read (:mod:`sharedcert`).
    """
    if dry_run:
        settings = dataclasses.replace(settings, directory=settings.dry_run_directory)
        replaces = None
    storage = open_storage(settings)
    shared = settings.state.shared
    local = FileStorage(settings.data_dir) if shared else storage
    started = time.monotonic()
    issuer: Issuer | None = None

    def failed(
        error: str, reason: FailureReason, retry_after: dt.datetime | None = None
    ) -> IssuanceResult:
        log.error("%s", error)
        return IssuanceResult.failure(
            error,
            reason,
            retry_after=retry_after,
            seconds=time.monotonic() - started,
            timings=issuer.timings if issuer else (),
        )

    def succeeded(pair: CertificatePair, adopted: bool = False) -> IssuanceResult:
        return IssuanceResult(
            ok=True,
            fingerprint=pair.fingerprint,
            serial=f"{pair.serial:x}",
            not_after=pair.not_after,
            dry_run=dry_run,
            seconds=time.monotonic() - started,
            timings=tuple(issuer.timings) if issuer else (),
            adopted=adopted,
        )

    try:
        # The shared store's lock renews its lease from a thread of its own while held.
        if shared and not dry_run:
            acquired = _lock_or_committed(settings, storage, record_version, agent_started)
            if isinstance(acquired, CertificatePair):
                return succeeded(acquired, adopted=True)
        else:
            acquired = storage.lock(
                statekeys.ISSUANCE_LOCK,
                lease=settings.state.lock_lease,
                timeout=LOCK_WAIT if shared else None,
            )
        with acquired as lock:
            record: sharedcert.CertificateRecord | None = None
            if shared and not dry_run:
                record = sharedcert.load(storage)
                taken = _committed_meanwhile(settings, record, record_version, agent_started)
                if taken is not None:
                    return succeeded(taken, adopted=True)
            issuer = Issuer(
                settings,
                storage,
                Account(settings, storage),
                PendingChallenges(local, storage if shared else None),
                lock.lost if shared else None,
            )
            pair = issuer.obtain(replaces=replaces)
            if shared and not dry_run:
                kept = _commit_shared(settings, storage, pair, record)
                if kept is not pair:
                    return succeeded(kept, adopted=True)
            elif not dry_run:
                issued.store_issued(settings, storage, pair)
    except IssuanceError as error:
        return failed(str(error), error.reason, error.retry_after)
    except LockTimeout as error:
        return failed(f"another replica is ordering: {error}", FailureReason.STORAGE)
    except ValueError as error:  # a malformed shared record
        return failed(str(error), FailureReason.STORAGE)
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        return failed(
            f"cannot store the certificate: {error.strerror or error}{where}",
            FailureReason.STORAGE,
        )
    except Exception as error:  # the agent must get an answer, not a traceback
        log.exception("the order failed unexpectedly")
        return failed(f"unexpected error: {type(error).__name__}: {error}", FailureReason.OTHER)
    return succeeded(pair)


def _lock_or_committed(
    settings: Settings,
    storage: Storage,
    seen_version: str | None,
    agent_started: float | None,
) -> Lock | CertificatePair:
    """The issuance lock, or the certificate another replica committed while we waited.

    The wait (:data:`LOCK_WAIT` in all) is cut into poll intervals; between them the
    certificate record is read: a holder that committed and still holds its lock (it
    crashed before releasing it, or its release failed) must not leave this replica
    serving the old certificate, nor ordering a second one once the lock is free.
    """
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        remaining = deadline - time.monotonic()
        try:
            return storage.lock(
                statekeys.ISSUANCE_LOCK,
                lease=settings.state.lock_lease,
                timeout=max(0.0, min(settings.state.poll_interval, remaining)),
            )
        except LockTimeout as error:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{error}, {LOCK_WAIT:g} s in all") from None
        record = sharedcert.load(storage)
        taken = _committed_meanwhile(settings, record, seen_version, agent_started)
        if taken is not None:
            return taken


def _committed_meanwhile(
    settings: Settings,
    record: sharedcert.CertificateRecord | None,
    seen_version: str | None,
    agent_started: float | None,
) -> CertificatePair | None:
    """The certificate another replica committed since the agent looked, if it serves us.

    ``seen_version`` None: the caller saw nothing to compare (order regardless).
    """
    if record is None:
        return None
    pair = record.pair
    if pair.names != frozenset(settings.domains):
        newer = agent_started is not None and record.committed_at.timestamp() > agent_started
        if newer:
            # Committed after this replica started, by one configured otherwise: a rolling
            # update in progress. Ordering back would make the replicas take turns.
            raise IssuanceError(
                "the shared certificate names "
                f"{', '.join(sorted(pair.names))}, committed by a replica started after this "
                "one (a configuration change rolling out?): not ordering over it",
                FailureReason.OTHER,
            )
        return None
    if seen_version is None or record.version == seen_version:
        return None
    if dt.datetime.now(dt.UTC) >= pair.not_after or record.directory != settings.directory:
        return None
    log.info("another replica committed %s meanwhile: serving it", pair.describe())
    CertStore(settings.cert_dir).save(pair)
    return pair


def _commit_shared(
    settings: Settings,
    storage: Storage,
    pair: CertificatePair,
    read: sharedcert.CertificateRecord | None,
) -> CertificatePair:
    """Commit ``pair`` over the record as read; the pair that stands (ours, or the one
    another replica committed first, ours then discarded)."""
    issued.record_issued(settings, storage, pair)
    try:
        sharedcert.commit(
            storage,
            pair,
            settings.directory,
            read.version if read else None,
            dt.datetime.now(dt.UTC),
        )
    except StorageConflict:
        standing = sharedcert.load(storage)
        if standing is None:
            raise IssuanceError(
                "the shared certificate record vanished during the order", FailureReason.STORAGE
            ) from None
        log.warning(
            "another replica committed %s first; %s is discarded",
            standing.pair.describe(),
            pair.describe(),
        )
        CertStore(settings.cert_dir).save(standing.pair)
        return standing.pair
    log.info("committed %s to the shared store", pair.describe())
    CertStore(settings.cert_dir).save(pair)
    return pair


def persist_records(settings: Settings) -> list[dnspersist.PersistRecord]:
    """dns-persist-01: the records to create once, registering the account if needed.

    The issuer domain name comes from the directory (or ACME_DNS_PERSIST_ISSUER): no order
    is placed. Raises IssuanceError when the CA cannot be reached, ConfigError when no
    issuer domain name can be known.
    """
    storage = open_storage(settings)
    issuer = Issuer(settings, storage, Account(settings, storage), PendingChallenges(storage))
    configured = settings.dns.persist_issuer if settings.dns else None
    # The issuer domain name first: without one, exit 2 before an account key is written.
    domain = dnspersist.choose_issuer(issuer.directory_meta(), configured)
    client = issuer._client()
    issuer._ensure_account(client)
    regr = client.net.account
    assert regr is not None
    return dnspersist.records_for(settings.domains, domain, regr.uri)
