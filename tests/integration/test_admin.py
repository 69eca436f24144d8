"""The admin endpoint over real HTTP: /healthz, /readyz, /metrics, and nothing else."""

from __future__ import annotations

import datetime as dt
import http.client
import math
import socket
import threading
import time
from collections.abc import Iterator

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from acme_registry.admin import (
    ACME_STEPS,
    FAILURE_REASONS,
    AdminServer,
    Metrics,
    step_label,
)
from acme_registry.outcome import FailureReason, IssuanceResult

NOT_BEFORE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)


class Readiness:
    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (False, "no certificate yet")
        self.fail = False

    def __call__(self) -> tuple[bool, str]:
        if self.fail:
            raise RuntimeError("boom")
        return self.answer


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def server(readiness: Readiness) -> Iterator[AdminServer]:
    admin = AdminServer("127.0.0.1", 0, Metrics(), readiness)
    admin.start()
    yield admin
    admin.stop()


def request(
    admin: AdminServer, path: str, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, admin.port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def families(admin: AdminServer) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """name -> {(sample name, sorted labels): value} from a real scrape."""
    status, headers, body = request(admin, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    parsed: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        samples = parsed.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def test_healthz(server):
    status, headers, body = request(server, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Cache-Control"] == "no-store"
    assert "Python" not in headers["Server"]
    status, headers, body = request(server, "/healthz", "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "3")


def test_healthz_follows_the_health_check(readiness):
    state = {"ok": False}
    admin = AdminServer(
        "127.0.0.1", 0, Metrics(), readiness, healthy=lambda: (state["ok"], "loop stuck")
    )
    admin.start()
    try:
        assert request(admin, "/healthz")[::2] == (503, b"loop stuck\n")
        state["ok"] = True
        assert request(admin, "/healthz")[::2] == (200, b"loop stuck\n")
    finally:
        admin.stop()


def test_readyz_follows_the_ready_callable(server, readiness):
    assert request(server, "/readyz")[::2] == (503, b"no certificate yet\n")
    assert request(server, "/readyz", "HEAD")[::2] == (503, b"")
    readiness.answer = (True, "")
    assert request(server, "/readyz")[::2] == (200, b"ready\n")
    readiness.answer = (True, "serving until 2026-04-01")
    assert request(server, "/readyz")[::2] == (200, b"serving until 2026-04-01\n")
    readiness.fail = True
    assert request(server, "/readyz")[::2] == (503, b"the check failed\n")
    # The endpoint survives a failing check.
    assert request(server, "/healthz")[0] == 200


@pytest.mark.parametrize("path", ["/", "/metrics/", "/healthz/x", "/v2/", "/../etc/passwd"])
def test_other_paths_are_404(server, path):
    assert request(server, path)[::2] == (404, b"not found\n")


def test_query_strings_are_ignored(server):
    assert request(server, "/healthz?verbose=1")[0] == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_refused(server, method):
    status, headers, _ = request(server, "/metrics", method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_metrics_carry_the_values_set(server):
    metrics = server.metrics
    metrics.set_certificate(["registry.test", "www.registry.test"], NOT_BEFORE, NOT_AFTER)
    metrics.set_next_renewal(dt.datetime(2026, 3, 2, tzinfo=dt.UTC))
    for _ in range(3):
        metrics.attempt()
    metrics.failure("network")
    metrics.failure("network")
    metrics.failure("not-a-reason")
    metrics.registry_started()
    metrics.observe_acme(0.2, "new order")
    metrics.observe_acme(7.0, "poll authorization")
    metrics.observe_issuance(4.5)

    found = families(server)
    for name in ("registry.test", "www.registry.test"):
        labels = (("domain", name),)
        not_after = found["acme_registry_certificate_not_after_timestamp_seconds"]
        not_before = found["acme_registry_certificate_not_before_timestamp_seconds"]
        assert not_after[("acme_registry_certificate_not_after_timestamp_seconds", labels)] == (
            NOT_AFTER.timestamp()
        )
        assert not_before[("acme_registry_certificate_not_before_timestamp_seconds", labels)] == (
            NOT_BEFORE.timestamp()
        )
    renewal = found["acme_registry_certificate_next_renewal_timestamp_seconds"]
    assert renewal == {
        ("acme_registry_certificate_next_renewal_timestamp_seconds", ()): dt.datetime(
            2026, 3, 2, tzinfo=dt.UTC
        ).timestamp()
    }
    assert found["acme_registry_renewal_attempts"] == {
        ("acme_registry_renewal_attempts_total", ()): 3.0
    }
    failures = {
        labels[0][1]: value
        for (_, labels), value in found["acme_registry_renewal_failures"].items()
    }
    assert failures == {reason: 0.0 for reason in FAILURE_REASONS} | {"network": 2.0, "other": 1.0}
    assert found["acme_registry_registry_generation_starts"] == {
        ("acme_registry_registry_generation_starts_total", ()): 1.0
    }
    requests = found["acme_registry_acme_request_duration_seconds"]
    key = "acme_registry_acme_request_duration_seconds"
    assert requests[(f"{key}_count", (("step", "new_order"),))] == 1.0
    assert requests[(f"{key}_bucket", (("le", "0.25"), ("step", "new_order")))] == 1.0
    assert requests[(f"{key}_bucket", (("le", "5.0"), ("step", "poll_authorization")))] == 0.0
    assert requests[(f"{key}_sum", (("step", "poll_authorization"),))] == 7.0
    issuance = found["acme_registry_issuance_duration_seconds"]
    assert issuance[("acme_registry_issuance_duration_seconds_count", ())] == 1.0
    assert issuance[("acme_registry_issuance_duration_seconds_sum", ())] == 4.5
    # No *_created series: they only say when the process started.
    assert not any(name.endswith("_created") for fam in found.values() for name, _ in fam)


def test_before_anything_is_known(server):
    found = families(server)
    assert found["acme_registry_certificate_not_after_timestamp_seconds"] == {}
    (value,) = found["acme_registry_certificate_next_renewal_timestamp_seconds"].values()
    assert math.isnan(value)
    assert found["acme_registry_renewal_attempts"] == {
        ("acme_registry_renewal_attempts_total", ()): 0.0
    }


def test_a_name_dropped_from_the_certificate_disappears(server):
    server.metrics.set_certificate(["a.test", "b.test"], NOT_BEFORE, NOT_AFTER)
    server.metrics.set_certificate(["a.test"], 1.0, 2.0)
    not_after = families(server)["acme_registry_certificate_not_after_timestamp_seconds"]
    assert not_after == {
        ("acme_registry_certificate_not_after_timestamp_seconds", (("domain", "a.test"),)): 2.0
    }
    server.metrics.clear_certificate()
    assert families(server)["acme_registry_certificate_not_after_timestamp_seconds"] == {}


def test_record_issuance_from_the_child_answer(server):
    metrics = server.metrics
    ok = {"ok": True, "timings": [["directory", 0.01], ["new order", 0.05], ["finalize", 0.3]]}
    assert metrics.record_issuance(IssuanceResult.from_mapping(ok), 2.0) is None
    failed = {
        "ok": False,
        "error": "validation of registry.test failed: connection: Connection refused",
        "reason": "validation",
        "timings": {"directory": 0.02, "weird step": 1.0},
    }
    reason = metrics.record_issuance(IssuanceResult.from_mapping(failed), 1.0)
    assert reason is FailureReason.VALIDATION and reason == "validation"
    # A malformed answer still counts the attempt and the failure.
    malformed = IssuanceResult.from_mapping({"timings": [["x"], None, "ab", [1, "nan?"]]})
    assert metrics.record_issuance(malformed, 0.5) == "other"

    found = families(server)
    assert (
        found["acme_registry_renewal_attempts"][("acme_registry_renewal_attempts_total", ())] == 3
    )
    failures = found["acme_registry_renewal_failures"]
    assert failures[("acme_registry_renewal_failures_total", (("reason", "validation"),))] == 1
    assert failures[("acme_registry_renewal_failures_total", (("reason", "other"),))] == 1
    counts = {
        labels[0][1]: value
        for (name, labels), value in found["acme_registry_acme_request_duration_seconds"].items()
        if name.endswith("_count")
    }
    assert counts == {"directory": 2, "new_order": 1, "finalize": 1, "other": 1}
    issuance = found["acme_registry_issuance_duration_seconds"]
    assert issuance[("acme_registry_issuance_duration_seconds_count", ())] == 3


def test_metrics_use_their_own_registry():
    first, second = Metrics(), Metrics()
    first.attempt()
    assert b"acme_registry_renewal_attempts_total 1.0" in first.render()
    assert b"acme_registry_renewal_attempts_total 0.0" in second.render()
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    assert b"acme_registry" not in global_text


def test_concurrent_scrapes_while_the_certificate_changes(server):
    names = [f"n{i}.test" for i in range(20)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            server.metrics.set_certificate(names, NOT_BEFORE, NOT_AFTER)
            time.sleep(0.0005)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20):
            not_after = families(server)["acme_registry_certificate_not_after_timestamp_seconds"]
            # Never half-cleared: all names or (before the first set) none.
            assert len(not_after) in (0, len(names))
    finally:
        stop.set()
        thread.join()


def test_every_address_listens_on_ipv4_and_ipv6(readiness):
    admin = AdminServer("", 0, Metrics(), readiness)
    admin.start()
    try:
        assert request(admin, "/healthz")[0] == 200
        if socket.has_dualstack_ipv6():
            assert request(admin, "/healthz", host="::1")[0] == 200
    finally:
        admin.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", admin.port), timeout=1).close()


def test_a_taken_port_is_an_error(server, readiness):
    with pytest.raises(OSError):
        AdminServer("127.0.0.1", server.port, Metrics(), readiness).start()


def test_step_labels_are_bounded():
    assert step_label("new order") == "new_order"
    assert step_label("Download certificate") == "download_certificate"
    assert step_label("something new") == "other"
    assert all(step_label(step) == step for step in ACME_STEPS)
