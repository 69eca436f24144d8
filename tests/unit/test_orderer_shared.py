"""The orderer under the shared lock: when another replica's certificate is taken instead of
ordering, when it is ordered over, and when ordering is refused (a newer configuration)."""

import datetime as dt
from pathlib import Path

import pytest

from acme_registry.certstore import CertificatePair, CertStore, parse_pair
from acme_registry.cli import _format_status
from acme_registry.config import ListenAddress, Settings
from acme_registry.issuer import IssuanceError, _committed_meanwhile
from acme_registry.outcome import IssuanceResult
from acme_registry.sharedcert import CertificateRecord
from tests.support.tls import TestCA

DIRECTORY = "https://ca.test/directory"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def settings(tmp_path: Path) -> Settings:
    return Settings(
        domains=("registry.test",),
        directory=DIRECTORY,
        cert_dir=tmp_path / "certs",
        data_dir=tmp_path / "data",
        http_port=80,
        registry_addr=ListenAddress("127.0.0.1", 443),
        registry_binary=Path("/usr/bin/docker-registry"),
    )


def record(
    ca: TestCA, names: tuple[str, ...] = ("registry.test",), *, version: str = "v2", **kw: object
) -> CertificateRecord:
    leaf, key = ca.issue_pair(names, ips=())
    pair: CertificatePair = parse_pair(leaf + ca.pem, key)
    committed = kw.get("committed_at", NOW)
    assert isinstance(committed, dt.datetime)
    return CertificateRecord(pair, str(kw.get("directory", DIRECTORY)), committed, version)


def test_another_replicas_commit_since_the_agent_looked_is_taken(tmp_path: Path, ca) -> None:
    found = record(ca)
    taken = _committed_meanwhile(settings(tmp_path), found, "v1", NOW.timestamp())
    assert taken is not None and taken.fingerprint == found.pair.fingerprint
    cached = CertStore(tmp_path / "certs").load()
    assert cached is not None and cached.fingerprint == found.pair.fingerprint


@pytest.mark.parametrize("seen", ["v2", None])
def test_the_record_the_agent_saw_or_no_comparison_means_order(tmp_path: Path, ca, seen) -> None:
    assert _committed_meanwhile(settings(tmp_path), record(ca), seen, NOW.timestamp()) is None


def test_no_record_means_order(tmp_path: Path) -> None:
    assert _committed_meanwhile(settings(tmp_path), None, "", NOW.timestamp()) is None


def test_a_record_from_another_directory_is_ordered_over(tmp_path: Path, ca) -> None:
    staging = record(ca, directory="https://staging.test/directory")
    assert _committed_meanwhile(settings(tmp_path), staging, "v1", NOW.timestamp()) is None


def test_other_names_committed_before_this_replica_started_are_ordered_over(
    tmp_path: Path, ca
) -> None:
    old = record(ca, ("old.test",), committed_at=NOW - dt.timedelta(hours=1))
    assert _committed_meanwhile(settings(tmp_path), old, "v2", NOW.timestamp()) is None


def test_other_names_committed_after_this_replica_started_stop_the_order(
    tmp_path: Path, ca
) -> None:
    newer = record(ca, ("new.test",), committed_at=NOW + dt.timedelta(seconds=5))
    with pytest.raises(IssuanceError, match="started after this one"):
        _committed_meanwhile(settings(tmp_path), newer, "v2", NOW.timestamp())


def test_adopted_survives_the_childs_json_line() -> None:
    result = IssuanceResult(ok=True, fingerprint="ab", adopted=True)
    assert IssuanceResult.from_json(result.to_json()).adopted is True
    failed = IssuanceResult.from_json('{"ok": false, "adopted": true, "reason": "other"}')
    assert failed.adopted is False


def test_status_text_says_when_the_shared_store_is_unreachable() -> None:
    answer = {"state_store": {"store": "s3", "reachable": False, "error": "refused"}}
    assert "state store: s3, UNREACHABLE: refused" in _format_status(answer)
    assert "state store" not in _format_status({"state_store": {"store": "file"}})
