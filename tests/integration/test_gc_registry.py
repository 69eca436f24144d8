"""Retention and garbage collection against the real registry binary, pushed to with skopeo.

The registry runs with ``storage.delete.enabled``; the read-only window is a restart onto the
same storage with ``storage.maintenance.readonly.enabled`` (what the agent's read-only
generation will be). Set ACME_REGISTRY_TEST_REGISTRY_BINARY to run them against 3.x.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from acme_registry import gc
from acme_registry.gcconfig import Pattern, RetentionRules
from acme_registry.registrytree import FilesystemTree
from tests.support.clients import Skopeo, registry_session
from tests.support.oci_layers import add_image, add_multiarch, children_of
from tests.support.ports import free_port
from tests.support.registry_process import RegistryProcess

# Pushes are made distinguishable by setting their tag links' mtimes: this far apart.
STEP = dt.timedelta(minutes=10)
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
KiB = 1024


@dataclass
class Env:
    registry: RegistryProcess
    skopeo: Skopeo
    api: gc.RegistryApi
    tree: FilesystemTree
    tag_delete: bool
    workdir: Path

    def ref(self, repo: str, tag: str) -> str:
        return f"{self.registry.host}/{repo}:{tag}"

    def push(self, layout: Path, repo: str, tag: str, pushed: dt.datetime, *, all_: bool = False):
        flags = ["--all"] if all_ else []
        self.skopeo.run(
            "copy",
            *flags,
            "--dest-tls-verify=true",
            "--dest-cert-dir",
            str(self.skopeo.cert_dir),
            f"oci:{layout}:{tag}",
            f"docker://{self.ref(repo, tag)}",
        )
        link = self.link(repo, tag)
        os.utime(link, (pushed.timestamp(), pushed.timestamp()))

    def link(self, repo: str, tag: str) -> Path:
        return (
            self.registry.storage_root
            / f"docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}/current/link"
        )

    def run(self, rules: RetentionRules, *, dry_run: bool = False, **kwargs) -> gc.GcReport:
        return gc.run_gc(
            tree=self.tree,
            rules=rules,
            api=self.api,
            binary=Path(self.registry.binary),
            config=self.registry.config_path(readonly=True),
            env=self.registry.env(),
            timeout=kwargs.pop("timeout", dt.timedelta(minutes=5)),
            enter_readonly=kwargs.pop("enter", lambda: self.registry.restart(readonly=True)),
            leave_readonly=kwargs.pop("leave", lambda: self.registry.restart(readonly=False)),
            tag_delete=self.tag_delete,
            dry_run=dry_run,
            now=T0 + 100 * STEP,
            **kwargs,
        )


@pytest.fixture
def env(tmp_path: Path, registry_binary: Path) -> Iterator[Env]:
    registry = RegistryProcess(tmp_path / "registry", free_port(), str(registry_binary))
    with registry:
        session = registry_session(registry.name, registry.ca.pem, tmp_path / "session")
        yield Env(
            registry=registry,
            skopeo=Skopeo(tmp_path / "skopeo", registry.ca.pem, [registry.name]),
            api=gc.RegistryApi(f"https://127.0.0.1:{registry.port}", session),
            tree=FilesystemTree(registry.storage_root),
            tag_delete=gc.supports_tag_delete(gc.registry_version(registry_binary)),
            workdir=tmp_path,
        )


def rules(keep_last: int, protect: tuple[str, ...] = ()) -> RetentionRules:
    return RetentionRules(keep_last=keep_last, protect=tuple(Pattern(p) for p in protect))


def blob_file_bytes(storage: Path) -> int:
    """Sum of the sizes of every file under blobs/: what the sweep removes, exactly."""
    total = 0
    for root, _, files in os.walk(storage / "docker/registry/v2/blobs"):
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


def du_bytes(storage: Path) -> int:
    """``du -sb`` of blobs/: file data plus the directories the registry keeps per blob."""
    out = subprocess.run(
        ["du", "-sb", str(storage / "docker/registry/v2/blobs")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def test_ci_history_keep_last_five_protect_latest(env: Env):
    layout = env.workdir / "layout"
    base = os.urandom(64 * KiB)  # shared by every image of both repositories
    deps = {"ci/app": os.urandom(32 * KiB), "ci/tool": os.urandom(24 * KiB)}
    builds = {"ci/app": 18, "ci/tool": 12}  # 30 tags
    pushed_digests: dict[str, str] = {}
    step = 0
    for repo, count in builds.items():
        for n in range(1, count + 1):
            tag = f"{repo.split('/')[1]}-b{n}"
            unique = os.urandom(16 * KiB + n)
            add_image(layout, tag, [("base", base), ("deps", deps[repo]), ("app", unique)])
            env.push(layout, repo, tag, T0 + step * STEP)
            pushed_digests[f"{repo}:{tag}"] = env.skopeo.manifest_digest(env.ref(repo, tag))
            step += 1
    # latest: the newest build of ci/app, and an old release of ci/tool (so that it keeps an
    # old manifest alive: on 2.x its build tag then stays too, on 3.x only the tag goes).
    for repo, target in (("ci/app", "app-b18"), ("ci/tool", "tool-b3")):
        env.skopeo.run(
            "copy",
            "--src-tls-verify=true",
            "--dest-tls-verify=true",
            "--src-cert-dir",
            str(env.skopeo.cert_dir),
            "--dest-cert-dir",
            str(env.skopeo.cert_dir),
            f"docker://{env.ref(repo, target)}",
            f"docker://{env.ref(repo, 'latest')}",
        )
        os.utime(env.link(repo, "latest"), ((T0 + 50 * STEP).timestamp(),) * 2)
        pushed_digests[f"{repo}:latest"] = pushed_digests[f"{repo}:{target}"]

    policy = rules(keep_last=5, protect=("latest",))
    dry = env.run(policy, dry_run=True)
    assert dry.ok, dry.error_line()
    assert dry.plan is not None
    announced = dry.plan.collectable_bytes
    print("\n".join(gc.describe_plan(dry.plan, tag_delete=env.tag_delete)))
    files_before, du_before = (
        blob_file_bytes(env.registry.storage_root),
        du_bytes(env.registry.storage_root),
    )
    assert env.registry.generation == 1  # the dry run changed nothing

    report = env.run(policy)
    assert report.ok, report.error_line()
    assert report.result == "success"
    summary = report.summary()
    assert summary["freed_bytes"] == summary["announced_bytes"] == announced
    assert summary["error"] is None and summary["readonly_seconds"] > 0
    assert report.collect is not None
    assert report.freed_bytes == announced
    print(
        f"collection {report.collect.seconds:.2f} s, read-only window "
        f"{report.collect.readonly_seconds:.2f} s, freed {report.freed_bytes} bytes"
    )

    expected = {
        "ci/app": {f"app-b{n}" for n in range(14, 19)} | {"latest"},
        "ci/tool": {f"tool-b{n}" for n in range(8, 13)} | {"latest"},
    }
    if not env.tag_delete:
        expected["ci/tool"].add("tool-b3")  # 2.x: deleting its manifest would take latest
        assert ("ci/tool:tool-b3", "its manifest stays; registry 2.x deletes by digest only") in (
            report.apply.kept
        )
    for repo, tags in expected.items():
        assert set(env.skopeo.list_tags(f"{env.registry.host}/{repo}")) == tags
        for tag in tags:
            ref = env.ref(repo, tag)
            assert env.skopeo.manifest_digest(ref) == pushed_digests[f"{repo}:{tag}"]
            env.skopeo.pull(ref, env.workdir / "pulled", f"{repo.replace('/', '-')}-{tag}")
    assert report.tags_removed == 30 + 2 - sum(len(t) for t in expected.values())

    files_after, du_after = (
        blob_file_bytes(env.registry.storage_root),
        du_bytes(env.registry.storage_root),
    )
    assert files_before - files_after == announced
    # du also counts the directory the registry keeps per blob (4 KiB each).
    removed_blobs = len(dry.plan.delete_manifests) * 3  # manifest, config, unique layer
    assert announced <= du_before - du_after <= announced + 4096 * (removed_blobs + 2)
    print(f"du -sb blobs/: {du_before} -> {du_after}, announced {announced}")


def test_multiarch_index_with_untagged_children_survives(env: Env):
    layout = env.workdir / "layout"
    for n in range(1, 4):
        add_image(layout, f"old{n}", [("app", os.urandom(8 * KiB))])
        env.push(layout, "multi", f"old{n}", T0 + n * STEP)
    index = add_multiarch(
        layout,
        "release",
        {"amd64": [("app", os.urandom(12 * KiB))], "arm64": [("app", os.urandom(12 * KiB))]},
    )
    env.push(layout, "multi", "release", T0 + 10 * STEP, all_=True)
    children = children_of(layout, "release")

    report = env.run(rules(keep_last=1))
    assert report.ok, report.error_line()
    assert {t for t in report.apply.removed_tags} == {f"multi:old{n}" for n in range(1, 4)}
    assert env.skopeo.list_tags(f"{env.registry.host}/multi") == ["release"]
    assert env.skopeo.manifest_digest(env.ref("multi", "release")) == index
    for child in children:
        ref = f"{env.registry.host}/multi@{child}"
        assert env.skopeo.manifest_digest(ref) == child
    env.skopeo.run(
        "copy",
        "--all",
        "--src-tls-verify=true",
        "--src-cert-dir",
        str(env.skopeo.cert_dir),
        f"docker://{env.ref('multi', 'release')}",
        f"oci:{env.workdir / 'pulled'}:release",
    )


def test_a_tag_moved_after_selection_is_not_removed(env: Env):
    layout = env.workdir / "layout"
    for n in range(1, 5):
        add_image(layout, f"b{n}", [("app", os.urandom(4 * KiB))])
        env.push(layout, "moving", f"b{n}", T0 + n * STEP)
    _, plan = gc.plan_run(env.tree, rules(keep_last=2), T0 + 100 * STEP)
    assert {t.ref for t in plan.removed_tags} == {"moving:b1", "moving:b2"}

    # b1 is pushed again (another image) between selection and deletion.
    moved = add_image(layout, "b1", [("app", os.urandom(4 * KiB))])
    env.push(layout, "moving", "b1", T0 + 50 * STEP)

    result = gc.apply_plan(plan, env.api, env.tree, tag_delete=env.tag_delete)
    assert result.errors == []
    assert result.removed_tags == ["moving:b2"]
    assert ("moving:b1", "moved since it was selected") in result.kept
    assert sorted(env.skopeo.list_tags(f"{env.registry.host}/moving")) == ["b1", "b3", "b4"]
    assert env.skopeo.manifest_digest(env.ref("moving", "b1")) == moved


def test_push_during_readonly_gets_405_and_a_timeout_ends_read_write(env: Env):
    layout = env.workdir / "layout"
    add_image(layout, "v1", [("app", os.urandom(4 * KiB))])
    env.push(layout, "ro", "v1", T0)
    add_image(layout, "v2", [("app", os.urandom(4 * KiB))])
    seen: list[str] = []
    calls: list[str] = []

    def enter() -> None:
        calls.append("enter")
        env.registry.restart(readonly=True)
        with pytest.raises(AssertionError) as refused:
            env.push(layout, "ro", "v2", T0 + STEP)
        seen.append(str(refused.value).splitlines()[-1])

    def leave() -> None:
        calls.append("leave")
        env.registry.restart(readonly=False)

    with pytest.raises(gc.GcTimeout):
        gc.collect(
            env.tree,
            binary=Path(env.registry.binary),
            config=env.registry.config_path(readonly=True),
            env=env.registry.env(),
            timeout=dt.timedelta(milliseconds=1),  # spent by the restart: gc is killed at once
            enter_readonly=enter,
            leave_readonly=leave,
        )
    assert calls == ["enter", "leave"]
    print(f"skopeo during the read-only window: {seen[0]}")
    assert "405" in seen[0]
    env.push(layout, "ro", "v2", T0 + 2 * STEP)  # the retry after the window succeeds
    assert sorted(env.skopeo.list_tags(f"{env.registry.host}/ro")) == ["v1", "v2"]


def test_a_run_past_gc_timeout_reports_timeout_and_serves_read_write(env: Env):
    layout = env.workdir / "layout"
    for n in range(1, 3):
        add_image(layout, f"b{n}", [("app", os.urandom(4 * KiB))])
        env.push(layout, "slow", f"b{n}", T0 + n * STEP)
    # The bound is the whole run's: 1 ms is spent by the snapshot, before any delete.
    report = env.run(rules(keep_last=1), timeout=dt.timedelta(milliseconds=1), enter=pytest.fail)
    assert report.result == "timeout"
    assert "retention's deletes stopped" in (report.error_line() or "")
    assert "GC_TIMEOUT" in (report.error_line() or "")
    assert report.apply.removed_tags == [] and report.collect is None
    assert not env.registry.readonly
    add_image(layout, "b3", [("app", os.urandom(4 * KiB))])
    env.push(layout, "slow", "b3", T0 + 5 * STEP)  # read-write throughout
    assert sorted(env.skopeo.list_tags(f"{env.registry.host}/slow")) == ["b1", "b2", "b3"]


def test_a_hung_registry_cannot_hold_the_delete_phase_past_gc_timeout(env: Env):
    """The registry stops answering (SIGSTOP: accepted by the kernel, never answered) after
    the plan: each call gets only what is left of the run, then the run ends as a timeout
    without entering the read-only window. Without the bound, each of the 4 selected tags'
    re-check would wait the client's own 30 s."""
    layout = env.workdir / "layout"
    for n in range(1, 6):
        add_image(layout, f"b{n}", [("app", os.urandom(4 * KiB))])
        env.push(layout, "hung", f"b{n}", T0 + n * STEP)
    assert env.registry.proc is not None
    pid = env.registry.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        report = env.run(rules(keep_last=1), timeout=dt.timedelta(seconds=3), enter=pytest.fail)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"run with a hung registry ended after {took:.1f} s (GC_TIMEOUT 3 s)")
    assert report.result == "timeout", report.summary()
    assert (report.error_line() or "").startswith(
        "retention's deletes stopped: the run reached the 3 s GC_TIMEOUT (0 tag(s) removed"
    ), report.error_line()
    assert report.apply.timed_out and report.apply.removed_tags == []
    assert report.collect is None and not env.registry.readonly
    # Far below the 4 x 30 s an unbounded phase would take (not a timing claim: a bound).
    assert took < 60
    assert len(env.skopeo.list_tags(f"{env.registry.host}/hung")) == 5
    report = env.run(rules(keep_last=1))  # the registry answers again: the next run works
    assert report.ok, report.error_line()
    assert env.skopeo.list_tags(f"{env.registry.host}/hung") == ["b5"]


def test_an_empty_registry_is_a_successful_run_without_a_window(env: Env):
    # 3.1.1's garbage-collect fails on a registry nothing was pushed to yet ("Path not
    # found: /docker/registry/v2/repositories"): a fresh install's first scheduled run.
    report = env.run(rules(keep_last=1), enter=pytest.fail)
    assert report.ok and report.result == "success", report.error_line()
    assert report.freed_bytes == 0 and report.summary()["readonly_seconds"] == 0


def test_leave_readonly_runs_when_entering_fails(env: Env):
    layout = env.workdir / "layout"
    add_image(layout, "v1", [("app", os.urandom(4 * KiB))])
    env.push(layout, "entering", "v1", T0)  # a registry with something to collect
    calls: list[str] = []

    def enter() -> None:
        calls.append("enter")
        raise RuntimeError("supervisord said no")

    report = env.run(rules(keep_last=1), enter=enter, leave=lambda: calls.append("leave"))
    assert calls == ["enter", "leave"]
    assert not report.ok and report.error_line() == "supervisord said no"
    assert report.result == "error"


def test_refusal_skips_collection_but_not_retention(env: Env):
    layout = env.workdir / "layout"
    for n in range(1, 3):
        add_image(layout, f"b{n}", [("app", os.urandom(4 * KiB))])
        env.push(layout, "shared", f"b{n}", T0 + n * STEP)
    refusal = gc.collection_refusal(shared_state_store=None, blob_descriptor_cache="redis")
    assert refusal is not None and "Redis" in refusal
    report = env.run(rules(keep_last=1), refusal=refusal, enter=pytest.fail)
    assert report.apply.removed_tags == ["shared:b1"]
    assert report.collect is None and report.error_line() == refusal
    assert report.result == "refused"
    summary = report.summary()
    assert summary["result"] == "refused" and summary["readonly_seconds"] is None
    assert summary["tags_removed"] == 1 and summary["error"] == refusal
    json.dumps(summary)  # what status --json and the control socket carry


def test_a_removed_index_takes_its_children_and_signatures_follow(env: Env):
    layout = env.workdir / "layout"
    old = add_multiarch(
        layout,
        "old",
        {"amd64": [("app", os.urandom(8 * KiB))], "arm64": [("app", os.urandom(8 * KiB))]},
    )
    env.push(layout, "idx", "old", T0, all_=True)
    old_children = children_of(layout, "old")
    new = add_image(layout, "new", [("app", os.urandom(8 * KiB))])
    env.push(layout, "idx", "new", T0 + STEP)
    # cosign-shaped tags: one signs the old index, one the new image; neither is counted.
    for subject, tag in ((old, "sig-old"), (new, "sig-new")):
        add_image(layout, tag, [("sig", os.urandom(KiB))])
        env.skopeo.run(
            "copy",
            "--dest-tls-verify=true",
            "--dest-cert-dir",
            str(env.skopeo.cert_dir),
            f"oci:{layout}:{tag}",
            f"docker://{env.ref('idx', 'sha256-' + subject.removeprefix('sha256:') + '.sig')}",
        )
    files_before = blob_file_bytes(env.registry.storage_root)

    report = env.run(rules(keep_last=1))
    assert report.ok, report.error_line()
    assert report.plan is not None
    deleted = [d.digest for d in report.plan.delete_manifests]
    assert len(deleted) == 4 and set(old_children) < set(deleted)  # index, 2 children, sig
    assert all(deleted.index(old) < deleted.index(child) for child in old_children)
    old_sig = f"idx:sha256-{old.removeprefix('sha256:')}.sig"
    assert sorted(report.apply.removed_tags) == sorted(["idx:old", old_sig])
    assert sorted(env.skopeo.list_tags(f"{env.registry.host}/idx")) == sorted(
        ["new", f"sha256-{new.removeprefix('sha256:')}.sig"]
    )
    assert env.skopeo.manifest_digest(env.ref("idx", "new")) == new
    assert (
        files_before - blob_file_bytes(env.registry.storage_root) == report.freed_bytes > 16 * KiB
    )
