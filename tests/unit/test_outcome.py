"""Failure reasons set where the kind is known, and the child's result on the wire."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
import requests
from acme import errors, messages

from acme_registry.admin import FAILURE_REASONS
from acme_registry.issuer import failure
from acme_registry.outcome import (
    FailureReason,
    IssuanceResult,
    problem_code,
    reason_for_problem,
)

ACME = "urn:ietf:params:acme:error:"


def problem(code: str, detail: str = "") -> messages.Error:
    return messages.Error(typ=ACME + code, detail=detail or None)


def test_the_reasons_are_the_metric_labels():
    expected = ("validation", "rate_limited", "network", "ca_error", "storage", "dns", "other")
    assert expected == FAILURE_REASONS


@pytest.mark.parametrize(
    ("problem_type", "validating", "reason"),
    [
        # A challenge's problem: the CA could not validate the name (DNS, port 80, CAA).
        (ACME + "unauthorized", True, FailureReason.VALIDATION),
        (ACME + "connection", True, FailureReason.VALIDATION),
        (ACME + "dns", True, FailureReason.VALIDATION),
        (ACME + "incorrectResponse", True, FailureReason.VALIDATION),
        (None, True, FailureReason.VALIDATION),
        # An order refused for a CAA record, even outside a challenge.
        (ACME + "caa", False, FailureReason.VALIDATION),
        (ACME + "rateLimited", False, FailureReason.RATE_LIMITED),
        (ACME + "rateLimited", True, FailureReason.RATE_LIMITED),
        (ACME + "serverInternal", False, FailureReason.CA_ERROR),
        (ACME + "badCSR", False, FailureReason.CA_ERROR),
        (ACME + "unauthorized", False, FailureReason.CA_ERROR),  # a deactivated account
        (ACME + "externalAccountRequired", False, FailureReason.CA_ERROR),
        (ACME + "rejectedIdentifier", False, FailureReason.CA_ERROR),
        (None, False, FailureReason.CA_ERROR),  # an order refused with no reason given
        ("about:blank", False, FailureReason.CA_ERROR),
    ],
)
def test_reason_for_problem(problem_type, validating, reason):
    assert reason_for_problem(problem_type, validating=validating) is reason
    assert reason.value in FAILURE_REASONS


def test_problem_code():
    assert problem_code(ACME + "rateLimited") == "rateLimited"
    assert problem_code("badNonce") == "badNonce"
    assert problem_code(None) == ""


@pytest.mark.parametrize(
    ("step", "error", "reason", "text"),
    [
        (
            "new order",
            problem("rateLimited", "too many certificates already issued"),
            FailureReason.RATE_LIMITED,
            "new order: rateLimited: too many certificates already issued",
        ),
        (
            "account registration",
            problem("rateLimited", "Your IP is rate limited"),
            FailureReason.RATE_LIMITED,
            "account registration: rateLimited: Your IP is rate limited",
        ),
        (
            "directory",
            requests.ConnectionError("HTTPSConnectionPool(host='ca', port=443): Max retries"),
            FailureReason.NETWORK,
            "directory: ConnectionError: HTTPSConnectionPool",
        ),
        (
            "directory",
            requests.ReadTimeout("HTTPSConnectionPool read timed out. (read timeout=30)"),
            FailureReason.NETWORK,
            "directory: ReadTimeout:",
        ),
        (
            "new order",
            requests.exceptions.SSLError("certificate verify failed"),
            FailureReason.NETWORK,
            "new order: SSLError: certificate verify failed",
        ),
        ("new order", problem("serverInternal", "oops"), FailureReason.CA_ERROR, "serverInternal"),
        ("finalize", problem("badCSR", "key too small"), FailureReason.CA_ERROR, "badCSR"),
        (
            "new order",
            problem("unauthorized", "account is deactivated"),
            FailureReason.CA_ERROR,
            "unauthorized: account is deactivated",
        ),
        (
            "account registration",
            problem("externalAccountRequired", "EAB needed"),
            FailureReason.CA_ERROR,
            "externalAccountRequired",
        ),
        (
            "new order",
            problem("rejectedIdentifier", "name forbidden by policy"),
            FailureReason.CA_ERROR,
            "rejectedIdentifier",
        ),
        (
            "new order",
            errors.ConflictError("https://ca.test/order/1"),
            FailureReason.CA_ERROR,
            "409 Conflict",
        ),
    ],
)
def test_failure_from_the_exception(step, error, reason, text):
    found = failure(step, error)
    assert found.reason is reason
    assert text in str(found)


def test_an_http_error_status_is_the_cas():
    response = requests.Response()
    response.status_code = 500
    response.url = "https://ca.test/dir"
    found = failure("directory", errors.ClientError(response))
    assert found.reason is FailureReason.CA_ERROR
    assert str(found) == "directory: HTTP 500 from https://ca.test/dir"


def test_the_problem_code_is_kept_for_the_issuer_to_act_on():
    assert failure("new order", problem("accountDoesNotExist")).problem == "accountDoesNotExist"
    assert failure("directory", requests.ConnectionError("x")).problem is None


def test_retry_after_is_kept_aware():
    when = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    assert failure("new order", problem("rateLimited"), when).retry_after == when


def test_a_result_survives_the_wire():
    result = IssuanceResult.failure(
        "new order: rateLimited: slow down",
        FailureReason.RATE_LIMITED,
        retry_after=dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC),
        seconds=1.5,
        timings=[("directory", 0.01), ("new order", 0.2)],
    )
    again = IssuanceResult.from_json(result.to_json())
    assert again == result
    ok = IssuanceResult(
        ok=True,
        fingerprint="ab" * 32,
        serial="1f",
        not_after=dt.datetime(2027, 3, 1, tzinfo=dt.UTC),
        seconds=0.4,
    )
    assert IssuanceResult.from_json(ok.to_json()) == ok
    assert ok.answer()["serial"] == "1f" and "timings" not in ok.answer()


@pytest.mark.parametrize(
    "text", ["", "not json", "[1, 2]", '{"ok": "yes"}', '{"ok": false, "reason": "cosmic"}']
)
def test_a_malformed_answer_is_a_failure_not_an_exception(text):
    result = IssuanceResult.from_json(text)
    assert not result.ok
    assert result.reason is FailureReason.OTHER
    assert result.error


def test_malformed_timings_are_skipped_and_naive_times_read_as_utc():
    data = {
        "ok": False,
        "reason": "network",
        "error": "x",
        "retry_after": "2026-12-01T12:00:00",
        "timings": [["x"], None, "ab", [1, "nan?"], ["directory", 0.5], ["poll", "nan"]],
    }
    result = IssuanceResult.from_json(json.dumps(data))
    assert result.reason is FailureReason.NETWORK
    assert result.timings == (("directory", 0.5),)
    assert result.retry_after == dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    mapped = IssuanceResult.from_json('{"ok": true, "timings": {"directory": 0.02}}')
    assert mapped.timings == (("directory", 0.02),)


def test_the_agent_reads_results_without_the_acme_stack():
    code = (
        "import sys, acme_registry.outcome, acme_registry.admin;"
        "bad = [m for m in ('cryptography', 'acme', 'josepy', 'requests') if m in sys.modules];"
        "print(','.join(bad))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == ""
