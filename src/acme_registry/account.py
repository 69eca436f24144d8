"""The ACME account: its key (0600 in DATA_DIR, one per directory) and its registration."""

from __future__ import annotations

import json
import logging

import josepy as jose
from acme import client as acme_client
from acme import errors, messages
from cryptography.hazmat.primitives.asymmetric import ec

from . import keys, statekeys
from .config import Settings
from .storage import Storage, StorageConflict

log = logging.getLogger(__name__)

ACCOUNT_ALG = jose.ES256


class Account:
    """Loads or creates the account key, and registers it (terms agreed, email, EAB)."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self._id = settings.directory_id

    def key(self) -> jose.JWK:
        pem = self.storage.load_bytes(statekeys.account_key(self._id))
        if pem is None:
            private = ec.generate_private_key(ec.SECP256R1())
            pem = keys.key_to_pem(private)
            try:
                self.storage.store(statekeys.account_key(self._id), pem, if_absent=True)
            except StorageConflict:
                # Another process made the key first: use that one, never two accounts.
                found = self.storage.load_bytes(statekeys.account_key(self._id))
                assert found is not None
                return jose.JWKEC(key=keys.load_key(found))
            self.storage.store(
                statekeys.account_directory(self._id), self.settings.directory.encode() + b"\n"
            )
            log.info("created a new ACME account key for %s", self.settings.directory)
        return jose.JWKEC(key=keys.load_key(pem))

    def registration(self) -> messages.RegistrationResource | None:
        data = self.storage.load_bytes(statekeys.account_registration(self._id))
        if data is None:
            return None
        try:
            uri = json.loads(data)["uri"]
        except (ValueError, KeyError, TypeError):
            return None
        return messages.RegistrationResource(uri=uri, body=messages.Registration())

    def register(self, client: acme_client.ClientV2) -> messages.RegistrationResource:
        """Create the account at the CA (or find it, if the key is already known there)."""
        eab = None
        if self.settings.eab_kid and self.settings.eab_hmac_key:
            key = client.net.key
            if key is None:
                raise RuntimeError("the ACME client has no account key")
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=key.public_key(),
                kid=self.settings.eab_kid,
                hmac_key=self.settings.eab_hmac_key,
                directory=client.directory,
            )
        new = messages.NewRegistration.from_data(
            email=self.settings.email,
            terms_of_service_agreed=True,
            external_account_binding=eab,
        )
        client.net.account = None
        try:
            regr = client.new_account(new)
        except errors.ConflictError as existing:
            regr = messages.RegistrationResource(
                uri=existing.location, body=messages.Registration()
            )
            client.net.account = regr
        self.storage.store(
            statekeys.account_registration(self._id),
            json.dumps({"uri": regr.uri, "directory": self.settings.directory}).encode() + b"\n",
        )
        log.info("ACME account ready: %s", regr.uri)
        return regr

    def forget(self) -> None:
        """Drop the stored registration (the CA no longer knows it); the key is kept."""
        self.storage.delete(statekeys.account_registration(self._id))
