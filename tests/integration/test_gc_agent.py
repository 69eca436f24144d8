"""Retention and collection through the real agent (`acme-registry run`): Pebble, the real
registry binary, skopeo, the CLI over the control socket.

The read-only window is held open by :class:`HeldCollection` (a `garbage-collect` that waits
for the test before running the real one), so what happens *during* it is tested without
racing it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from acme_registry import gc
from tests.support.agent import (
    CREDS,
    NAME,
    PASSWORD,
    USER,
    AgentProcess,
    fingerprint,
    served,
    served_instead_of,
    start_agent,
)
from tests.support.clients import Skopeo, registry_session
from tests.support.held_collection import HeldCollection, kill_session, serving_registries
from tests.support.oci_layers import add_image, add_multiarch, children_of
from tests.support.ports import free_port
from tests.support.pull_loop import PullLoop

KEEP = {"RETENTION_KEEP_LAST": "2", "RETENTION_PROTECT": "latest", "GC_SCHEDULE": "off"}
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def storage_of(agent: AgentProcess) -> Path:
    return Path(agent.env["REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"])


def push_history(
    agent: AgentProcess, skopeo: Skopeo, layout: Path, repo: str, tags: list[str]
) -> None:
    """Each tag an image of a shared layer and its own; pushed ten minutes apart (link mtime)."""
    shared = ("shared", os.urandom(48 * 1024))
    for number, tag in enumerate(tags):
        add_image(layout, tag, [shared, (tag, os.urandom(32 * 1024))])
        skopeo.push(layout, tag, f"{NAME}:{agent.registry_port}/{repo}:{tag}")
        pushed = (T0 + dt.timedelta(minutes=10 * number)).timestamp()
        link = (
            storage_of(agent)
            / f"docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}/current/link"
        )
        os.utime(link, (pushed, pushed))


def found(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not in:\n{text}"
    return match[1]


def blob_file_bytes(storage: Path) -> int:
    total = 0
    for root, _, files in os.walk(storage / "docker/registry/v2/blobs"):
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


def metric(agent: AgentProcess, series: str) -> float:
    body = requests.get(f"{agent.admin_url}/metrics", timeout=10).text
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {series} in /metrics:\n{body}")


def gc_in_background(agent: AgentProcess) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "acme_registry", "gc"],
        env=agent.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_gc_keeps_the_right_tags_frees_the_announced_bytes_and_serves_through_the_window(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    held = HeldCollection(tmp_path / "held", registry_binary)
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, held.binary, **KEEP)
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        layout = tmp_path / "layout"
        push_history(agent, skopeo, layout, "ci/app", ["t1", "t2", "t3", "t4", "t5"])
        add_image(layout, "latest", [("old", os.urandom(16 * 1024))])
        skopeo.push(layout, "latest", f"{NAME}:{agent.registry_port}/ci/app:latest")
        os.utime(
            storage_of(agent)
            / "docker/registry/v2/repositories/ci/app/_manifests/tags/latest/current/link",
            (T0.timestamp(), T0.timestamp()),
        )
        repo = f"{NAME}:{agent.registry_port}/ci/app"
        digests = {t: skopeo.manifest_digest(f"{repo}:{t}") for t in ("t4", "t5", "latest")}

        dry = agent.cli("gc", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        removes = sorted(re.findall(r"^remove \(.*\): (ci/app:\w+)", dry.stdout, re.M))
        assert removes == ["ci/app:t1", "ci/app:t2", "ci/app:t3"], dry.stdout
        announced = int(found(r"collection would free (\d+) bytes", dry.stdout))
        assert announced > 3 * 32 * 1024  # each removed tag's own layer, at least
        assert sorted(skopeo.list_tags(repo)) == [
            "latest",
            "t1",
            "t2",
            "t3",
            "t4",
            "t5",
        ]  # unchanged

        before = blob_file_bytes(storage_of(agent))
        starts = metric(agent, "acme_registry_registry_generation_starts_total")
        session = registry_session(NAME, pebble.root_pem(), tmp_path / "pulls")
        session.auth = (USER, PASSWORD)
        base = f"https://127.0.0.1:{agent.registry_port}"
        with PullLoop(session, base, "ci/app:t5") as pulls:
            run = gc_in_background(agent)
            held.wait_started()
            assert metric(agent, "acme_registry_readonly") == 1.0
            add_image(layout, "t6", [("new", os.urandom(16 * 1024))])
            with pytest.raises(AssertionError, match="405"):
                skopeo.push(layout, "t6", f"{repo}:t6")
            time.sleep(0.5)  # a few more pulls inside the window
            held.release()
            out, err = run.communicate(timeout=120)
            time.sleep(0.5)  # and a few on the new read-write generation
        print(f"{pulls.pulls} pulls, {pulls.retries} retried refused connects")
        assert run.returncode == 0, err
        assert pulls.failures == [] and pulls.pulls > 0
        assert re.search(r"^3 tag\(s\) removed, 3 manifest\(s\) deleted", out, re.M), out
        freed = int(found(r"(\d+) byte\(s\) freed", out))
        assert freed == announced == before - blob_file_bytes(storage_of(agent))

        assert sorted(skopeo.list_tags(repo)) == ["latest", "t4", "t5"]
        for tag, digest in digests.items():
            skopeo.pull(f"{repo}:{tag}", tmp_path / "pulled", tag)
            assert skopeo.manifest_digest(f"{repo}:{tag}") == digest
        skopeo.push(layout, "t6", f"{repo}:t6")  # read-write again

        state = json.loads(agent.cli("status", "--json").stdout)["gc"]
        assert state["last_run"]["result"] == "success"
        assert state["last_run"]["tags_removed"] == 3
        assert state["last_run"]["freed_bytes"] == freed
        assert state["retention"]["keep_last"] == 2
        assert metric(agent, 'acme_registry_gc_runs_total{result="success"}') == 1.0
        assert metric(agent, "acme_registry_gc_freed_bytes_total") == freed
        assert metric(agent, "acme_registry_retention_removed_tags_total") == 3.0
        assert metric(agent, "acme_registry_readonly") == 0.0
        # Two generation switches: into the read-only window and out of it.
        assert metric(agent, "acme_registry_registry_generation_starts_total") == starts + 2
        assert metric(agent, "acme_registry_gc_last_success_timestamp_seconds") > T0.timestamp()
        assert metric(agent, "acme_registry_storage_bytes") > 0

        users = agent.cli("user", "list")
        assert "acme-registry-gc\tinternal (retention)" in users.stdout
        assert agent.cli("user", "remove", "acme-registry-gc").returncode != 0
    finally:
        held.release()
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


# Token mode: ci may push (so pull) ci/*, never delete; tester (AUTH_USERS' user, no grant)
# may do everything, as in htpasswd mode.
TOKEN_POLICY = 'users:\n  ci:\n    push: ["ci/*"]\n'
CI_PASSWORD = "ci-Pa55word-long-enough"


def token_env(tmp_path: Path) -> dict[str, str]:
    policy = tmp_path / "policy.yml"
    policy.write_text(TOKEN_POLICY)
    return {
        "AUTH_MODE": "token",
        "AUTH_USERS": f"{CREDS},ci:{CI_PASSWORD}",
        "AUTH_POLICY_FILE": str(policy),
        "TOKEN_ADDR": f"127.0.0.1:{free_port()}",
    }


def test_retention_in_token_mode_deletes_with_its_own_tokens_and_lets_no_one_else_delete(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    """AUTH_MODE=token: the registry takes bearer tokens only. The dry run and `gc` remove
    what the KEEP rule selects (through tokens the agent mints for itself), the kept images
    still pull, a user without delete still cannot delete, and there is no internal user to
    log in as."""
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, registry_binary, **KEEP, **token_env(tmp_path))
    try:
        served(agent, pebble)
        agent.wait_ready()
        ci = Skopeo(tmp_path / "ci", pebble.root_pem(), [NAME], creds=f"ci:{CI_PASSWORD}")
        layout = tmp_path / "layout"
        push_history(agent, ci, layout, "ci/app", ["t1", "t2", "t3", "t4"])
        repo = f"{NAME}:{agent.registry_port}/ci/app"
        kept = {t: ci.manifest_digest(f"{repo}:{t}") for t in ("t3", "t4")}

        dry = agent.cli("gc", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        removes = sorted(re.findall(r"^remove \(.*\): (ci/app:\w+)", dry.stdout, re.M))
        assert removes == ["ci/app:t1", "ci/app:t2"], dry.stdout
        announced = int(found(r"collection would free (\d+) bytes", dry.stdout))
        assert sorted(ci.list_tags(repo)) == ["t1", "t2", "t3", "t4"]  # unchanged

        before = blob_file_bytes(storage_of(agent))
        run = agent.cli("gc", timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(r"^2 tag\(s\) removed, 2 manifest\(s\) deleted", run.stdout, re.M)
        freed = int(found(r"(\d+) byte\(s\) freed", run.stdout))
        assert freed == announced == before - blob_file_bytes(storage_of(agent)) > 0

        assert sorted(ci.list_tags(repo)) == ["t3", "t4"]
        for tag, digest in kept.items():
            ci.pull(f"{repo}:{tag}", tmp_path / "pulled", tag)
            assert ci.manifest_digest(f"{repo}:{tag}") == digest
        add_image(layout, "t5", [("t5", os.urandom(16 * 1024))])
        ci.push(layout, "t5", f"{repo}:t5")  # read-write again after the window

        # ci has no delete: its token leaves delete out and the registry refuses.
        delete = ["delete", "--tls-verify=true", "--cert-dir", str(ci.cert_dir)]
        with pytest.raises(AssertionError, match=r"(?s)Failed to delete .*401 Unauthorized"):
            ci.run(*delete, "--creds", f"ci:{CI_PASSWORD}", f"docker://{repo}:t4")
        assert ci.manifest_digest(f"{repo}:t4") == kept["t4"]
        # No internal user exists to log in as: the token service knows only real users.
        users = agent.cli("user", "list").stdout
        assert "acme-registry-gc" not in users and "internal" not in users, users
        with pytest.raises(AssertionError, match="invalid username/password"):
            Skopeo(
                tmp_path / "gc-user", pebble.root_pem(), [NAME], creds="acme-registry-gc:x"
            ).list_tags(repo)

        state = json.loads(agent.cli("status", "--json").stdout)["gc"]
        assert state["last_run"]["result"] == "success" and state["last_run"]["tags_removed"] == 2
        assert metric(agent, 'acme_registry_gc_runs_total{result="success"}') == 1.0
        assert metric(agent, "acme_registry_readonly") == 0.0
    finally:
        agent.stop_cleanly()
    log = agent.log()
    assert "Traceback" not in log
    # No token in the log: a JWT's header always starts with these base64url bytes ('{"').
    assert "eyJ" not in log, [line for line in log.splitlines() if "eyJ" in line][:3]


def set_pushed(agent: AgentProcess, repo: str, tag: str, when: dt.datetime) -> None:
    link = storage_of(agent) / f"docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}"
    os.utime(link / "current/link", (when.timestamp(), when.timestamp()))


def test_a_multiarch_index_with_untagged_children_survives_retention_and_collection(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    """An index tagged `release` (kept) and `rc2` (selected), an older index `rc1` sharing
    its amd64 child (selected), older single images (selected): after `gc` every child of
    `release` still pulls, the shared one included; rc1's own child is swept."""
    pebble = pebble_factory(free_port())
    agent = start_agent(
        tmp_path, pebble, registry_binary, RETENTION_KEEP_LAST="1", GC_SCHEDULE="off"
    )
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        layout = tmp_path / "layout"
        repo = f"{NAME}:{agent.registry_port}/multi"
        for n in range(3):
            add_image(layout, f"old{n}", [("app", os.urandom(8 * 1024))])
            skopeo.push(layout, f"old{n}", f"{repo}:old{n}")
            set_pushed(agent, "multi", f"old{n}", T0 + dt.timedelta(minutes=n))
        shared = [("app", os.urandom(12 * 1024))]  # the same child in both indexes
        rc1 = add_multiarch(layout, "rc1", {"amd64": shared, "arm64": [("a", os.urandom(9000))]})
        release = add_multiarch(
            layout, "release", {"amd64": shared, "arm64": [("b", os.urandom(10000))]}
        )
        rc1_children, children = children_of(layout, "rc1"), children_of(layout, "release")
        assert rc1_children[0] == children[0] and rc1_children[1] != children[1]
        for tag, source, minute in (("rc1", "rc1", 10), ("rc2", "release", 20)):
            skopeo.push(layout, source, f"{repo}:{tag}", all_images=True)
            set_pushed(agent, "multi", tag, T0 + dt.timedelta(minutes=minute))
        skopeo.push(layout, "release", f"{repo}:release", all_images=True)  # newest: kept

        result = agent.cli("gc", timeout=120)
        assert result.returncode == 0, result.stderr

        tag_delete = gc.supports_tag_delete(gc.registry_version(registry_binary))
        # 2.x deletes by digest only: rc2 shares release's manifest, so it stays there.
        expected = ["release"] if tag_delete else ["rc2", "release"]
        assert sorted(skopeo.list_tags(repo)) == expected, result.stdout
        assert skopeo.manifest_digest(f"{repo}:release") == release
        for n, child in enumerate(children):
            assert skopeo.manifest_digest(f"{repo}@{child}") == child
            skopeo.pull(f"{repo}@{child}", tmp_path / "pulled", f"child{n}")
        skopeo.pull(f"{repo}:release", tmp_path / "pulled", "release", all_images=True)
        for gone in (rc1, rc1_children[1]):
            with pytest.raises(AssertionError, match=r"manifest unknown|not found|404"):
                skopeo.manifest_digest(f"{repo}@{gone}")
        state = json.loads(agent.cli("status", "--json").stdout)["gc"]["last_run"]
        assert state["result"] == "success" and state["freed_bytes"] > 9000 + 3 * 8 * 1024
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_kill_9_of_the_agent_during_a_collection_next_start_serves_read_write(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    held = HeldCollection(tmp_path / "held", registry_binary)
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, held.binary, **KEEP)
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        layout = tmp_path / "layout"
        push_history(agent, skopeo, layout, "ci/app", ["t1", "t2", "t3"])
        run = gc_in_background(agent)
        held.wait_started()
        assert metric(agent, "acme_registry_readonly") == 1.0
        assert agent.proc is not None
        kill_session(agent.proc.pid)  # the container's PID 1 dies: everything in it
        held.kill()
        agent.proc.wait(timeout=30)
        assert run.wait(timeout=30) != 0
    finally:
        held.kill()
        agent.stop()

    again = AgentProcess(agent.workdir, agent.env).start()
    try:
        served(again, pebble)
        again.wait_ready()
        add_image(layout, "after", [("after", os.urandom(16 * 1024))])
        repo = f"{NAME}:{again.registry_port}/ci/app"
        skopeo.push(layout, "after", f"{repo}:after")
        assert "after" in skopeo.list_tags(repo)
        assert metric(again, "acme_registry_readonly") == 0.0
    finally:
        held.release()
        again.stop_cleanly()


@pytest.mark.parametrize("auth_mode", ["htpasswd", "token"])
def test_a_short_schedule_fires_by_itself(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path, auth_mode: str
) -> None:
    """In token mode too: the scheduled run deletes with tokens the agent mints."""
    pebble = pebble_factory(free_port())
    mode = token_env(tmp_path) if auth_mode == "token" else {}
    # The history is pushed with the schedule off: a run's read-only window would refuse it.
    first = start_agent(tmp_path, pebble, registry_binary, GC_SCHEDULE="off", **mode)
    try:
        served(first, pebble)
        first.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        push_history(first, skopeo, tmp_path / "layout", "app", ["old", "new"])
    finally:
        first.stop_cleanly()
    env = {**first.env, "RETENTION_KEEP_LAST": "1", "GC_SCHEDULE": "every 10s"}
    agent = AgentProcess(first.workdir, env).start()
    try:
        served(agent, pebble)
        agent.wait_ready()
        deadline = time.monotonic() + 120
        state: dict[str, Any] = {}
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = json.loads(agent.cli("status", "--json").stdout)["gc"]
            last = state.get("last_run") or {}
            if last:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"no scheduled run: {state}\n{agent.log()}")
        assert state["schedule"] == "every 10s"
        assert last["result"] == "success" and last["tags_removed"] == 1, last
        assert str(state["next_run"]) > str(last["started"])
        assert skopeo.list_tags(f"{NAME}:{agent.registry_port}/app") == ["new"]
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def push_after_windows(skopeo: Skopeo, layout: Path, tag: str, ref: str) -> None:
    """A push retried while a scheduled window refuses it (405), as a client would."""
    deadline = time.monotonic() + 90
    while True:
        try:
            skopeo.push(layout, tag, ref)
            return
        except AssertionError as error:
            if "405" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_renew_during_a_scheduled_collection_is_answered_and_stays_read_only(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    """The schedule's run goes on its own thread: while its read-only window is held open,
    `renew` is answered (the new certificate served by a read-only generation: the sweep may
    be running), `status` answers, and `gc` waits for the scheduled run and says so."""
    held = HeldCollection(tmp_path / "held", registry_binary)
    pebble = pebble_factory(free_port())
    env = {**KEEP, "GC_SCHEDULE": "every 30s"}
    agent = start_agent(tmp_path, pebble, held.binary, **env)
    try:
        first = served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        layout = tmp_path / "layout"
        repo = f"{NAME}:{agent.registry_port}/ci/app"
        # Something to collect: a run on an empty registry has no window at all.
        add_image(layout, "first", [("first", os.urandom(16 * 1024))])
        push_after_windows(skopeo, layout, "first", f"{repo}:first")
        held.wait_started(timeout=90)  # the schedule fired by itself; its window is held
        assert metric(agent, "acme_registry_readonly") == 1.0

        renew = agent.cli("renew", timeout=120)
        assert renew.returncode == 0, renew.stdout + renew.stderr
        renewed = served_instead_of(agent, pebble, first)
        assert fingerprint(renewed) != fingerprint(first)
        # Still inside the window: the generation on the new certificate is read-only too.
        add_image(layout, "during", [("during", os.urandom(16 * 1024))])
        with pytest.raises(AssertionError, match="405"):
            skopeo.push(layout, "during", f"{repo}:during")
        assert metric(agent, "acme_registry_readonly") == 1.0
        assert agent.cli("status").returncode == 0

        asked = gc_in_background(agent)
        time.sleep(1)
        assert asked.poll() is None  # waits for the scheduled run
        held.release()
        out, err = asked.communicate(timeout=120)
        assert asked.returncode == 0, err
        assert re.match(r"a scheduled run started at \S+ was in progress; waited for it", out), out
        assert "tag(s) removed" in out

        state = json.loads(agent.cli("status", "--json").stdout)["gc"]
        assert state["last_run"]["result"] == "success", state
        assert fingerprint(served(agent, pebble)) == fingerprint(renewed)
        push_after_windows(skopeo, layout, "during", f"{repo}:during")  # read-write again
        assert "during" in skopeo.list_tags(repo)
    finally:
        held.release()
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_a_collection_past_gc_timeout_is_stopped_and_the_registry_serves_read_write(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    held = HeldCollection(tmp_path / "held", registry_binary)
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, held.binary, **KEEP, GC_TIMEOUT="8s")
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        layout = tmp_path / "layout"
        push_history(agent, skopeo, layout, "ci/app", ["t1", "t2", "t3"])
        result = agent.cli("gc", timeout=120)  # held past the timeout: never released
        assert result.returncode == 1
        assert "GC_TIMEOUT" in result.stderr, result.stderr
        state = json.loads(agent.cli("status", "--json").stdout)["gc"]
        assert state["last_run"]["result"] == "timeout"
        assert "GC_TIMEOUT" in state["last_run"]["error"]
        assert state["last_success"] is None
        text = agent.cli("status").stdout
        assert "gc error:    garbage-collect stopped: the run reached the 8 s GC_TIMEOUT" in text
        assert metric(agent, 'acme_registry_gc_runs_total{result="timeout"}') == 1.0
        assert metric(agent, "acme_registry_readonly") == 0.0
        add_image(layout, "after", [("after", os.urandom(16 * 1024))])
        skopeo.push(layout, "after", f"{NAME}:{agent.registry_port}/ci/app:after")
    finally:
        held.release()
        agent.stop_cleanly()


def test_a_hung_registry_during_retentions_deletes_ends_the_run_at_gc_timeout(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    """GC_TIMEOUT bounds the whole run, not only the read-only window: a registry that
    accepts connections and never answers (SIGSTOP) during retention's deletes."""
    pebble = pebble_factory(free_port())
    # Long enough for the second, real run: on 3.x its two generation switches each wait
    # out supervisord's startsecs (seen: 5 s were too few on this busy machine).
    agent = start_agent(tmp_path, pebble, registry_binary, **KEEP, GC_TIMEOUT="20s")
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        layout = tmp_path / "layout"
        push_history(agent, skopeo, layout, "ci/app", ["t1", "t2", "t3", "t4"])
        assert agent.proc is not None
        frozen = serving_registries(agent.proc.pid)
        assert len(frozen) == 1, frozen
        os.kill(frozen[0], signal.SIGSTOP)
        try:
            result = agent.cli("gc", timeout=120)
        finally:
            os.kill(frozen[0], signal.SIGCONT)
        assert result.returncode == 1
        assert "retention's deletes stopped: the run reached the 20 s GC_TIMEOUT" in result.stderr
        state = json.loads(agent.cli("status", "--json").stdout)["gc"]
        assert state["last_run"]["result"] == "timeout"
        assert state["last_run"]["readonly_seconds"] is None  # never went read-only
        assert "retention's deletes stopped" in agent.cli("status").stdout
        assert metric(agent, 'acme_registry_gc_runs_total{result="timeout"}') == 1.0
        assert metric(agent, "acme_registry_readonly") == 0.0
        repo = f"{NAME}:{agent.registry_port}/ci/app"
        assert sorted(skopeo.list_tags(repo)) == ["t1", "t2", "t3", "t4"]
        add_image(layout, "after", [("after", os.urandom(16 * 1024))])
        skopeo.push(layout, "after", f"{repo}:after")  # read-write, the same generation
        again = agent.cli("gc", timeout=120)
        assert again.returncode == 0, again.stderr
        assert sorted(skopeo.list_tags(repo)) == ["after", "t4"]
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_with_a_redis_cache_configured_retention_runs_and_collection_is_refused(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    """Several replicas share a Redis blob descriptor cache: a collection would leave it
    answering for swept blobs. Nothing listens on the address (the registry only connects
    when its cache uses it): the refusal comes from the configuration alone."""
    pebble = pebble_factory(free_port())
    redis = f"127.0.0.1:{free_port()}"
    agent = start_agent(tmp_path, pebble, registry_binary, **KEEP, REGISTRY_REDIS_ADDR=redis)
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        push_history(agent, skopeo, tmp_path / "layout", "ci/app", ["t1", "t2", "t3"])
        before = blob_file_bytes(storage_of(agent))
        starts = metric(agent, "acme_registry_registry_generation_starts_total")
        result = agent.cli("gc", timeout=120)
        assert result.returncode == 1
        assert "garbage collection refused: a Redis blob descriptor cache" in result.stderr
        repo = f"{NAME}:{agent.registry_port}/ci/app"
        assert sorted(skopeo.list_tags(repo)) == ["t2", "t3"]  # retention still ran
        assert blob_file_bytes(storage_of(agent)) == before  # nothing swept
        # Never read-only: no generation switch at all.
        assert metric(agent, "acme_registry_registry_generation_starts_total") == starts
        state = json.loads(agent.cli("status", "--json").stdout)["gc"]
        assert state["last_run"]["result"] == "refused"
        assert state["last_run"]["tags_removed"] == 1
        assert "REGISTRY_REDIS_ADDR" in state["last_run"]["error"]
        assert metric(agent, 'acme_registry_gc_runs_total{result="refused"}') == 1.0
    finally:
        agent.stop_cleanly()
    assert "Traceback" not in agent.log()


def test_stopping_the_agent_during_a_collection_kills_garbage_collect(
    tmp_path: Path, pebble_factory: Any, registry_binary: Path
) -> None:
    held = HeldCollection(tmp_path / "held", registry_binary)
    pebble = pebble_factory(free_port())
    agent = start_agent(tmp_path, pebble, held.binary, **KEEP)
    try:
        served(agent, pebble)
        agent.wait_ready()
        skopeo = Skopeo(tmp_path / "skopeo", pebble.root_pem(), [NAME], creds=CREDS)
        push_history(agent, skopeo, tmp_path / "layout", "ci/app", ["t1"])  # not empty
        run = gc_in_background(agent)
        pid = held.wait_started()
        agent.stop_cleanly()
        assert run.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.1)
        assert not process_alive(pid), "garbage-collect outlived the agent"
    finally:
        held.kill()
        agent.stop()


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
