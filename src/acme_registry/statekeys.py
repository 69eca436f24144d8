"""Every storage key, built in one place (like certmagic's ``KeyBuilder``).

Keys are relative paths with ``/``. With :class:`~.storage.FileStorage` they are the
paths under DATA_DIR that the README lists, so existing data directories keep working:
change a key here and every DATA_DIR in the field is orphaned.
"""

from __future__ import annotations

# Locks (FileStorage keeps them under locks/).
ISSUANCE_LOCK = "issuance"  # one order at a time: the agent's child and any other
USERS_LOCK = "users"  # the agent and a CLI may change users at once

BACKOFF = "state/backoff.json"  # failed attempts in a row, the next attempt
ARI = "state/ari.json"  # the CA's suggested window and the instant chosen in it
PENDING_ORDER = "orders/pending.json"  # an order being finalized (holds its key)
DNS01_RECORDS = "orders/dns01-records.json"  # TXT records added for an order, until removed
HTTP_SECRET = "registry/http-secret"  # the registry's http.secret, shared by generations
USERS = "auth/users.json"  # run-time users (name -> bcrypt hash)
INITIAL_ADMIN_PASSWORD = "auth/initial-admin-password"
CHALLENGES = "challenges"  # the prefix of pending HTTP-01 tokens
# A shared store only (STATE_STORE=s3): what every replica serves and answers.
CERTIFICATE = "certificate/current.json"  # chain + key + fingerprint, replaced as a whole
ORDER_IN_FLIGHT = "orders/in-flight.json"  # an orderer is validating: look tokens up here
ISSUED = "issued"  # the prefix of issuance records
# Overwritten (a random body) by every writer of a record the replicas follow, after its
# write: each replica polls only this one (statechanges).
CHANGES = "state/changes"

# Local files under DATA_DIR that are derived, never stored: each replica writes its own.
HTPASSWD_FILE = "auth/htpasswd"  # the registry's htpasswd, written from USERS
# A shared store: USERS as last read, for token mode's logins after a start with it down.
USERS_COPY_FILE = "auth/users-copy.json"
OPERATOR_TLS_DIR = "tls"  # ACME_ENABLED=false: the operator's pair once it settled


def lock(name: str) -> str:
    return f"locks/{name}"


def account(directory_id: str) -> str:
    """The folder of one ACME account (one per directory URL)."""
    return f"accounts/{directory_id}"


def account_key(directory_id: str) -> str:
    return f"{account(directory_id)}/key.pem"


def account_registration(directory_id: str) -> str:
    return f"{account(directory_id)}/account.json"


def account_directory(directory_id: str) -> str:
    """The directory URL the account belongs to, for a human reading DATA_DIR."""
    return f"{account(directory_id)}/directory"


def issued(fingerprint: str) -> str:
    """The issuance record of the certificate with this SHA-256 fingerprint."""
    return f"{ISSUED}/{fingerprint}.json"


def challenge(token: str) -> str:
    return f"{CHALLENGES}/{token}"


# Token mode's signing keyring (signing keys and the refresh-token secret).
TOKEN_KEYRING = "token/keyring.json"

# Values a reader of the bucket must not learn: a shared store encrypts exactly these
# (statecrypt). With the account key and dns-persist-01 anyone could get certificates for
# our names; with the keyring mint tokens; with http.secret forge upload state.
_SECRET_KEYS = frozenset(
    {
        CERTIFICATE,
        PENDING_ORDER,
        HTTP_SECRET,
        USERS,
        INITIAL_ADMIN_PASSWORD,
        TOKEN_KEYRING,
    }
)


def is_secret(key: str) -> bool:
    """Whether the value stored under ``key`` is a secret (private key, hash, password)."""
    if key in _SECRET_KEYS:
        return True
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "accounts" and parts[2] == "key.pem"
