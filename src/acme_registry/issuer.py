"""One order from new-order to chain, read top to bottom in :meth:`Issuer.obtain`.

The acme library does the protocol; this module adds what it lacks for unattended use:
short polling that honours Retry-After (the library sleeps a fixed second, a ~2 s floor
per issuance), retries of badNonce beyond the library's one, and retries of transient
network and 5xx errors.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import errors, messages

from . import __version__, keys
from .account import ACCOUNT_ALG, Account
from .certstore import CertificatePair, parse_pair
from .challenges import PendingChallenges
from .config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

ORDER_TIMEOUT = 180.0
NETWORK_TIMEOUT = 30
BAD_NONCE_RETRIES = 10
TRANSIENT_RETRIES = 4
POLL_FIRST = 0.05
POLL_MAX = 2.0


class IssuanceError(Exception):
    """An order failed; ``str()`` is one line naming the step and the CA's reason."""


class Issuer:
    def __init__(self, settings: Settings, account: Account, challenges: PendingChallenges) -> None:
        self.settings = settings
        self.account = account
        self.challenges = challenges

    def obtain(self) -> CertificatePair:
        """Place one order for every configured name and return the issued pair."""
        deadline = time.monotonic() + ORDER_TIMEOUT
        client = self._client()
        self._ensure_account(client)

        key = keys.generate_key(self.settings.key_type)
        csr = keys.make_csr(key, self.settings.domains)
        order = self._call("new order", partial(client.new_order, csr), client)
        log.info("order placed for %s: %s", ", ".join(self.settings.domains), order.uri)

        answered = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                answered.append(self._answer_http01(client, authz))
            for authz in order.authorizations:
                self._wait_authorization(client, authz, deadline)
        finally:
            for token in answered:
                self.challenges.remove(token)

        order = self._finalize(client, order, csr, deadline)
        pair = parse_pair(order.fullchain_pem.encode(), keys.key_to_pem(key))
        log.info("certificate issued: %s", pair.describe())
        return pair

    def _client(self) -> acme_client.ClientV2:
        verify: str | bool = str(self.settings.ca_bundle) if self.settings.ca_bundle else True
        net = acme_client.ClientNetwork(
            key=self.account.key(),
            alg=ACCOUNT_ALG,
            verify_ssl=verify,  # type: ignore[arg-type]  # requests takes a bundle path too
            user_agent=f"acme-registry/{__version__} acme-python",
            timeout=NETWORK_TIMEOUT,
        )
        directory = self._retry(
            "directory", lambda: acme_client.ClientV2.get_directory(self.settings.directory, net)
        )
        return acme_client.ClientV2(directory, net)

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
        raise IssuanceError(f"the CA offers no HTTP-01 challenge for {name}")

    def _wait_authorization(
        self,
        client: acme_client.ClientV2,
        authz: messages.AuthorizationResource,
        deadline: float,
    ) -> None:
        name = authz.body.identifier.value
        pause = POLL_FIRST
        while True:
            authz, response = self._call("poll authorization", partial(client.poll, authz), client)
            status = authz.body.status
            if status == messages.STATUS_VALID:
                return
            if status != messages.STATUS_PENDING:
                raise IssuanceError(f"validation of {name} failed: {_challenge_error(authz)}")
            pause = _sleep_before_poll(response, pause, deadline, f"validation of {name}")

    def _finalize(
        self,
        client: acme_client.ClientV2,
        order: messages.OrderResource,
        csr: bytes,
        deadline: float,
    ) -> messages.OrderResource:
        pause = POLL_FIRST
        finalized = False
        while True:
            response = self._call("poll order", partial(client._post_as_get, order.uri), client)
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_INVALID:
                reason = body.error.detail if body.error else "no reason given"
                raise IssuanceError(f"the CA refused the order: {reason}")
            if body.status == messages.STATUS_VALID and body.certificate:
                chain = self._call(
                    "download certificate", partial(client._post_as_get, body.certificate), client
                )
                return order.update(body=body, fullchain_pem=chain.text)
            if body.status == messages.STATUS_READY and not finalized:
                order = order.update(body=body, csr_pem=csr)
                order = self._call("finalize", partial(client.begin_finalization, order), client)
                finalized = True
                continue
            pause = _sleep_before_poll(response, pause, deadline, "the order")

    def _call(self, step: str, action: Callable[[], T], client: acme_client.ClientV2) -> T:
        """Run an account-authenticated step, registering again if the CA forgot us."""
        try:
            return self._retry(step, action)
        except IssuanceError as error:
            if "accountDoesNotExist" not in str(error) and "unauthorized" not in str(error):
                raise
        log.warning("the CA no longer knows the stored account; registering again")
        self.account.forget()
        self._retry("account registration", lambda: self.account.register(client))
        return self._retry(step, action)

    def _retry(self, step: str, action: Callable[[], T]) -> T:
        bad_nonces = transient = 0
        while True:
            try:
                return action()
            except messages.Error as error:
                if error.code == "badNonce" and bad_nonces < BAD_NONCE_RETRIES:
                    bad_nonces += 1
                    continue
                if _is_transient(error) and transient < TRANSIENT_RETRIES:
                    transient += 1
                    time.sleep(0.25 * 2**transient)
                    continue
                raise IssuanceError(f"{step}: {_describe(error)}") from None
            except (requests.ConnectionError, requests.Timeout, errors.ClientError) as error:
                if transient < TRANSIENT_RETRIES and not _is_client_side(error):
                    transient += 1
                    log.warning("%s: %s; retrying", step, _short(error))
                    time.sleep(0.25 * 2**transient)
                    continue
                raise IssuanceError(f"{step}: {_short(error)}") from None


def _sleep_before_poll(
    response: requests.Response, pause: float, deadline: float, what: str
) -> float:
    """Sleep before the next poll: Retry-After when the CA gives one, else a short backoff."""
    wait = pause
    header = response.headers.get("Retry-After")
    if header:
        when = acme_client.ClientV2.retry_after(response, default=1)
        wait = max(0.0, (when - dt.datetime.now()).total_seconds())
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise IssuanceError(f"timed out waiting for {what}")
    time.sleep(min(wait, remaining))
    return min(pause * 2, POLL_MAX)


def _challenge_error(authz: messages.AuthorizationResource) -> str:
    for challb in authz.body.challenges:
        if challb.error is not None:
            return _describe(challb.error)
    return f"authorization is {authz.body.status}"


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


def obtain_and_store(settings: Settings) -> dict[str, object]:
    """The issuing child process: one order, then the pair into CERT_DIR.

    The issuance record goes to DATA_DIR before the pair is switched in, so a pair in
    CERT_DIR that we issued always has its record (and its directory) on file.
    """
    from .certstore import CertStore
    from .storage import FileStorage

    storage = FileStorage(settings.data_dir)
    try:
        with storage.lock("issuance"):
            pair = Issuer(settings, Account(settings, storage), PendingChallenges(storage)).obtain()
            storage.store_json(
                f"issued/{pair.fingerprint}.json",
                {
                    "directory": settings.directory,
                    "issued_at": dt.datetime.now(dt.UTC).isoformat(),
                    "names": sorted(pair.names),
                },
            )
            CertStore(settings.cert_dir).save(pair)
    except IssuanceError as error:
        log.error("%s", error)
        return {"ok": False, "error": str(error)}
    except OSError as error:
        message = f"cannot store the certificate: {error.strerror}: {error.filename}"
        log.error("%s", message)
        return {"ok": False, "error": message}
    return {"ok": True, "fingerprint": pair.fingerprint, "not_after": pair.not_after.isoformat()}
