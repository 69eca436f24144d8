"""The responder's look into the shared store: only while an order is in flight, misses
cached, and the stateless answer when the store is down (only when asked for)."""

from pathlib import Path

import josepy as jose
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from acme_registry import statekeys
from acme_registry.challenges import PendingChallenges
from acme_registry.sharedchallenges import SharedChallenges, account_thumbprint
from acme_registry.storage import FileStorage

TOKEN = "tok_" + "A" * 39
OTHER = "tok_" + "B" * 39
NAMES = ("registry.test",)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Unreachable(FileStorage):
    """A directory store that can be switched off, as an S3 server can stop answering."""

    down = False

    def load(self, key: str):  # type: ignore[no-untyped-def]
        if self.down:
            raise ConnectionRefusedError(111, "connection refused")
        return super().load(key)


@pytest.fixture
def shared(tmp_path: Path) -> Unreachable:
    return Unreachable(tmp_path / "shared")


def orderer(tmp_path: Path, shared: FileStorage) -> PendingChallenges:
    return PendingChallenges(FileStorage(tmp_path / "orderer"), shared)


def test_no_store_request_for_tokens_while_no_order_is_in_flight(shared: Unreachable) -> None:
    clock = Clock()
    lookup = SharedChallenges(shared, NAMES, clock=clock)
    for _ in range(100):
        assert lookup.lookup(TOKEN, "registry.test") is None
    assert lookup.store_requests == 1  # the marker check, cached for a second
    clock.now += 1.5
    assert lookup.lookup(TOKEN, "registry.test") is None
    assert lookup.store_requests == 2


def test_the_orderers_token_is_found_while_its_order_is_in_flight(
    tmp_path: Path, shared: Unreachable
) -> None:
    clock = Clock()
    pending = orderer(tmp_path, shared)
    pending.add(TOKEN, f"{TOKEN}.thumb")
    lookup = SharedChallenges(shared, NAMES, clock=clock)
    assert lookup.lookup(TOKEN, "registry.test") == f"{TOKEN}.thumb"
    # An unknown token costs one store request, then is a cached miss for a second.
    before = lookup.store_requests
    for _ in range(50):
        assert lookup.lookup(OTHER, "registry.test") is None
    assert lookup.store_requests == before + 1
    pending.remove(TOKEN)
    pending.finish()
    assert shared.load(statekeys.ORDER_IN_FLIGHT) is None
    clock.now += 1.5
    assert lookup.lookup(TOKEN, "registry.test") is None


def test_finish_leaves_another_orderers_marker(tmp_path: Path, shared: Unreachable) -> None:
    first = orderer(tmp_path, shared)
    first.add(TOKEN, "x")
    second = PendingChallenges(FileStorage(tmp_path / "second"), shared)
    second.add(OTHER, "y")  # took over: its marker replaced the first's
    first.finish()
    assert shared.load(statekeys.ORDER_IN_FLIGHT) is not None
    second.finish()
    assert shared.load(statekeys.ORDER_IN_FLIGHT) is None


def test_clear_forgets_only_the_local_tokens(tmp_path: Path, shared: Unreachable) -> None:
    pending = orderer(tmp_path, shared)
    pending.add(TOKEN, "x")
    pending.clear()
    assert pending.lookup(TOKEN) is None
    assert shared.load_bytes(statekeys.challenge(TOKEN)) == b"x"


def test_store_down_no_answer_without_the_flag(shared: Unreachable) -> None:
    lookup = SharedChallenges(shared, NAMES)
    lookup.thumbprint = "thumb"
    shared.down = True
    assert lookup.lookup(TOKEN, "registry.test") is None


def test_store_down_stateless_answer_for_our_names_only(shared: Unreachable) -> None:
    clock = Clock()
    lookup = SharedChallenges(shared, NAMES, stateless=True, clock=clock)
    lookup.thumbprint = "thumb"
    shared.down = True
    assert lookup.lookup(TOKEN, "registry.test:80") == f"{TOKEN}.thumb"
    assert lookup.lookup(TOKEN, "REGISTRY.test.") == f"{TOKEN}.thumb"
    assert lookup.lookup(TOKEN, "elsewhere.test") is None
    assert lookup.lookup(TOKEN, None) is None
    assert lookup.lookup("not a token!", "registry.test") is None
    # Down is remembered for a second: a flood of tokens does not hammer a dead store.
    requests = lookup.store_requests
    for _ in range(20):
        lookup.lookup(OTHER, "registry.test")
    assert lookup.store_requests == requests


def test_account_thumbprint_matches_josepy() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    expected = jose.b64encode(jose.JWKEC(key=key).thumbprint()).decode()
    assert account_thumbprint(pem) == expected


def test_account_thumbprint_refuses_other_curves() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="P-256"):
        account_thumbprint(pem)
