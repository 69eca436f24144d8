"""One retention + garbage-collection run against a serving registry.

A run has three phases, each usable on its own:

1. :func:`plan_run`: snapshot the storage tree and select what retention removes (pure
   beyond reading storage). ``acme-registry gc --dry-run`` stops here.
2. :func:`apply_plan`: delete through the registry's HTTP API while it serves read-write.
   Right before each delete the selected tags are checked again, over HTTP (HEAD gives the
   digest the tag points at now) and in storage (no other tag has moved onto the manifest
   since): a tag pushed or moved meanwhile is never removed. Registry 2.8 deletes manifests
   by digest only, which removes every tag on it, so a manifest goes only when all its tags
   are selected; 3.x also deletes a single tag (``DELETE /v2/<repo>/manifests/<tag>``).
3. :func:`collect`: ``enter_readonly()`` (the caller switches to a generation with
   ``storage.maintenance.readonly.enabled``), count the bytes of the blobs nothing
   references, run ``registry garbage-collect CONFIG`` (never ``--delete-untagged``) within
   the timeout, and ``leave_readonly()`` on every path, timeout and errors included.

:func:`run_gc` chains them into the run the schedule and ``acme-registry gc`` start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .gcconfig import RetentionRules
from .registrytree import (
    Snapshot,
    TreeStore,
    parse_manifest,
    tags_pointing_at,
    take_snapshot,
)
from .retention import ManifestDelete, Plan, cosign_subject, plan_retention

# Every manifest type, so that 2.8 never converts a schema2 manifest to schema1 for us
# (a converted manifest has another digest, and the re-check would see a moved tag).
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")
_OUTPUT_TAIL = 2000
# A rotation on 2.x refuses connections for a few ms; 50 ms later it serves again.
REFUSED_RETRY_DELAY = 0.05
# Running garbage-collect processes (each in its own session), for stop_running().
_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()


class GcError(RuntimeError):
    """A run that could not do its job; ``str()`` is the one line for status and logs."""


class GcTimeout(GcError):
    pass


def registry_version(binary: Path) -> str:
    """What ``registry --version`` prints, e.g. ``github.com/docker/distribution 2.8.2+ds1``."""
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return (result.stdout or result.stderr).strip()


def supports_tag_delete(version_output: str) -> bool:
    """Whether the registry deletes a single tag: distribution 3.0 and later."""
    matches = _VERSION.findall(version_output)
    if not matches:
        raise GcError(f"cannot read the registry version from {version_output[:80]!r}")
    major = int(matches[-1][0])
    return major >= 3


def collection_refusal(
    *,
    shared_state_store: str | None,
    blob_descriptor_cache: str | None,
    redis_addr: str | None = None,
) -> str | None:
    """Why a collection must not start with several replicas, or None when it may.

    Collection is safe only when every writer is read-only before the mark phase starts and
    no cache remembers a swept blob after; one replica can promise that, several cannot yet.
    ``shared_state_store`` is STATE_STORE's value when it is not ``file``; ``redis_addr``
    REGISTRY_REDIS_ADDR(S) (a Redis the registry's blob descriptor cache may use).
    Retention's tag removal alone may still run.
    """
    if shared_state_store:
        return (
            f"garbage collection refused: STATE_STORE={shared_state_store} is shared by "
            "several replicas; every replica would have to be read-only first"
        )
    if (blob_descriptor_cache or "").strip().lower() == "redis" or (redis_addr or "").strip():
        return (
            "garbage collection refused: a Redis blob descriptor cache is configured "
            "(REGISTRY_REDIS_ADDR or REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR=redis); it would "
            "keep answering for swept blobs"
        )
    return None


class RegistryApi:
    """The few registry API calls retention needs, over a caller-configured session
    (trust and credentials are the caller's: the agent's internal user in htpasswd mode).

    ``bearer`` (token mode) mints a token for a repository; every call then carries one
    for the repository it touches, so no call can reach another repository.
    """

    def __init__(
        self,
        base_url: str,
        session: requests.Session,
        timeout: float = 30,
        bearer: Callable[[str], str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.bearer = bearer

    def manifest_digest(
        self, repository: str, reference: str, timeout: float | None = None
    ) -> str | None:
        """The digest ``reference`` (a tag) resolves to now; None if it does not exist."""
        response = self._request(
            "HEAD",
            repository,
            f"{self.base_url}/v2/{repository}/manifests/{reference}",
            timeout,
            {"Accept": MANIFEST_ACCEPT},
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise GcError(f"HEAD {repository}:{reference}: HTTP {response.status_code}")
        return response.headers.get("Docker-Content-Digest")

    def delete_manifest(self, repository: str, reference: str, timeout: float | None = None) -> int:
        """DELETE a manifest by digest (or a tag, on 3.x); returns the HTTP status."""
        response = self._request(
            "DELETE", repository, f"{self.base_url}/v2/{repository}/manifests/{reference}", timeout
        )
        return response.status_code

    def _request(
        self,
        method: str,
        repository: str,
        url: str,
        timeout: float | None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """``timeout`` caps the call (what is left of the run); a refused connect is tried
        once more: on 2.x a certificate rotation refuses connections for milliseconds, and
        a refused connect sent nothing, so repeating it (a DELETE too) is safe."""
        seconds = self.timeout if timeout is None else max(0.001, min(self.timeout, timeout))
        if self.bearer is not None:
            headers = {**(headers or {}), "Authorization": f"Bearer {self.bearer(repository)}"}
        try:
            return self.session.request(method, url, headers=headers, timeout=seconds)
        except requests.ConnectionError as error:
            if "refused" not in str(error).lower():
                raise
            time.sleep(REFUSED_RETRY_DELAY)
            return self.session.request(method, url, headers=headers, timeout=seconds)


@dataclass
class ApplyResult:
    removed_tags: list[str] = field(default_factory=list)  # repo:tag
    deleted_manifests: list[str] = field(default_factory=list)  # repo@digest
    kept: list[tuple[str, str]] = field(default_factory=list)  # (repo:tag, why) not removed
    errors: list[str] = field(default_factory=list)
    # The run's deadline came before every selected delete was done (the rest stays).
    timed_out: bool = False


class _OutOfTime(Exception):
    """The run's GC_TIMEOUT is spent: the delete phase stops where it is."""


class _Deadline:
    """What is left of the run for each API call (None: no deadline)."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    def left(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise _OutOfTime
        return left


@dataclass(frozen=True)
class CollectResult:
    freed_bytes: int  # the blobs nothing referenced when collection started
    seconds: float  # garbage-collect's own time
    readonly_seconds: float  # from enter_readonly() to the end of leave_readonly()
    output_tail: str


@dataclass
class GcReport:
    started: dt.datetime
    dry_run: bool
    plan: Plan | None = None
    apply: ApplyResult = field(default_factory=ApplyResult)
    collect: CollectResult | None = None
    finished: dt.datetime | None = None
    errors: list[str] = field(default_factory=list)
    # For acme_registry_gc_runs_total{result}: success, error, timeout, refused, dry_run.
    result: str = "success"

    @property
    def ok(self) -> bool:
        return not self.errors and not self.apply.errors

    @property
    def tags_removed(self) -> int:
        return len(self.apply.removed_tags)

    @property
    def freed_bytes(self) -> int:
        return self.collect.freed_bytes if self.collect else 0

    def summary(self) -> dict[str, object]:
        """The JSON-able record ``status`` shows and the control socket answers with."""
        collected = self.collect
        return {
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "dry_run": self.dry_run,
            "result": self.result,
            "tags_removed": self.tags_removed,
            "manifests_deleted": len(self.apply.deleted_manifests),
            "tags_kept": [f"{ref} ({why})" for ref, why in self.apply.kept],
            "freed_bytes": self.freed_bytes,
            "announced_bytes": self.plan.collectable_bytes if self.plan else None,
            "readonly_seconds": round(collected.readonly_seconds, 3) if collected else None,
            "collect_seconds": round(collected.seconds, 3) if collected else None,
            "error": self.error_line(),
        }

    def error_line(self) -> str | None:
        problems = self.errors + self.apply.errors
        if not problems:
            return None
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return problems[0] + more


def plan_run(tree: TreeStore, rules: RetentionRules, now: dt.datetime) -> tuple[Snapshot, Plan]:
    snapshot = take_snapshot(tree)
    return snapshot, plan_retention(snapshot, rules, now)


def describe_plan(plan: Plan, *, tag_delete: bool) -> list[str]:
    """The dry run's lines: each tag's fate and why, then the bytes collection would free."""
    lines = []
    untag_only = {t.ref for t in plan.untag_only}
    for decision in plan.decisions:
        tag = decision.tag
        when = tag.pushed.strftime("%Y-%m-%dT%H:%M:%SZ")
        if decision.remove and tag.ref in untag_only and not tag_delete:
            verdict = "keep  (its manifest stays and registry 2.x deletes by digest only)"
        elif decision.remove:
            verdict = f"remove ({decision.reason})"
        else:
            verdict = f"keep  ({decision.reason})"
        lines.append(f"{verdict}: {tag.ref} {tag.digest[:19]} pushed {when}")
    lines.append(
        f"{len(plan.delete_manifests)} manifests to delete; collection would free "
        f"{plan.collectable_bytes} bytes ({plan.freed_bytes} from retention, "
        f"{plan.unreferenced_bytes} already unreferenced)"
    )
    return lines


def apply_plan(
    plan: Plan,
    api: RegistryApi,
    tree: TreeStore,
    *,
    tag_delete: bool,
    deadline: float | None = None,
) -> ApplyResult:
    """Delete what ``plan`` selected, skipping anything that moved since it was made.

    ``deadline`` (``time.monotonic()``) bounds the phase: each call gets at most what is
    left, and once it is spent nothing more is deleted (``timed_out``); a hung registry
    cannot hold the run past GC_TIMEOUT.
    """
    result = ApplyResult()
    try:
        _apply(plan, api, tree, tag_delete, _Deadline(deadline), result)
    except _OutOfTime:
        result.timed_out = True
    return result


def _apply(
    plan: Plan,
    api: RegistryApi,
    tree: TreeStore,
    tag_delete: bool,
    deadline: _Deadline,
    result: ApplyResult,
) -> None:
    planned = {(d.repository, d.digest) for d in plan.delete_manifests}
    parents: dict[tuple[str, str], set[str]] = {}
    snapshot_children = _children_in_plan(plan, tree)
    for (repo, parent), children in snapshot_children.items():
        for child in children:
            parents.setdefault((repo, child), set()).add(parent)
    done: set[tuple[str, str]] = set()
    # Subjects before their cosign signatures, so a signature never outlives the decision
    # about what it signs; within each group the plan's order (an index before children).
    ordered = sorted(plan.delete_manifests, key=lambda d: _is_signature_delete(d))
    for delete in ordered:
        key = (delete.repository, delete.digest)
        why = _blocked(delete, parents.get(key, set()), done, planned, api, tree, deadline)
        if why is not None:
            result.kept.extend(
                (f"{delete.repository}:{t}", why.get(t, why[""])) for t in delete.tags
            )
            continue
        try:
            status = api.delete_manifest(delete.repository, delete.digest, deadline.left())
        except requests.RequestException as exc:
            result.errors.append(f"DELETE {delete.repository}@{delete.digest}: {exc}")
            continue
        if status in (200, 202, 404):  # 404: gone already, which is what was wanted
            done.add(key)
            result.deleted_manifests.append(f"{delete.repository}@{delete.digest}")
            result.removed_tags.extend(f"{delete.repository}:{t}" for t in delete.tags)
        else:
            result.errors.append(f"DELETE {delete.repository}@{delete.digest}: HTTP {status}")
    for tag in plan.untag_only:
        if not tag_delete:
            result.kept.append((tag.ref, "its manifest stays; registry 2.x deletes by digest only"))
            continue
        subject = cosign_subject(tag.name)
        if subject and (tag.repository, subject) in planned - done:
            result.kept.append((tag.ref, "the image it signs was kept"))
            continue
        try:
            if api.manifest_digest(tag.repository, tag.name, deadline.left()) != tag.digest:
                result.kept.append((tag.ref, "moved since it was selected"))
                continue
            status = api.delete_manifest(tag.repository, tag.name, deadline.left())
        except (requests.RequestException, GcError) as exc:
            result.errors.append(f"DELETE {tag.ref}: {exc}")
            continue
        if status in (200, 202, 404):
            result.removed_tags.append(tag.ref)
        else:
            result.errors.append(f"DELETE {tag.ref}: HTTP {status}")


def garbage_collect(
    binary: Path, config: Path, env: Mapping[str, str], timeout: float
) -> tuple[float, str]:
    """``registry garbage-collect CONFIG``; (seconds, output tail). GcTimeout past ``timeout``
    (the process group is killed: a sweep stopped half-way leaves the rest for next time)."""
    started = time.monotonic()
    # A file, not a pipe: garbage-collect prints a line per blob, megabytes on a big registry.
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            [str(binary), "garbage-collect", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
        with _running_lock:
            _running.add(proc)
        try:
            proc.wait(timeout=max(timeout, 0.001))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise GcTimeout(
                f"garbage-collect stopped after the {timeout:.0f} s GC_TIMEOUT"
            ) from None
        finally:
            with _running_lock:
                _running.discard(proc)
        output.seek(max(0, output.seek(0, os.SEEK_END) - _OUTPUT_TAIL))
        tail = output.read().decode(errors="replace")
    if proc.returncode != 0:
        last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
        raise GcError(f"garbage-collect exited with {proc.returncode}: {last}")
    return time.monotonic() - started, tail


def stop_running() -> None:
    """Kill every garbage-collect still running (the agent is stopping): its own session
    would outlive the agent otherwise. A sweep stopped half-way leaves the rest for later."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def collect(
    tree: TreeStore,
    *,
    binary: Path,
    config: Path,
    env: Mapping[str, str],
    timeout: dt.timedelta,
    enter_readonly: Callable[[], None],
    leave_readonly: Callable[[], None],
    deadline: float | None = None,
) -> CollectResult:
    """The read-only window: count, collect, and always serve read-write again.

    garbage-collect is stopped at ``deadline`` (``time.monotonic()``: the run's, which
    started before the deletes), or ``timeout`` from now without one.
    """
    if deadline is None:
        deadline = time.monotonic() + timeout.total_seconds()
    window_start = time.monotonic()
    try:
        enter_readonly()
        # Read-only now: nothing changes until leave_readonly(), so what nothing references
        # at this moment is exactly what the sweep deletes.
        freed = take_snapshot(tree).unreferenced_bytes()
        try:
            seconds, tail = garbage_collect(binary, config, env, deadline - time.monotonic())
        except GcTimeout:
            # The bound is the run's (deletes and the switch to read-only included), so
            # name the setting's value, not what was left of it for garbage-collect.
            raise GcTimeout(
                f"garbage-collect stopped: the run reached the "
                f"{timeout.total_seconds():.0f} s GC_TIMEOUT"
            ) from None
    finally:
        leave_readonly()
    return CollectResult(freed, seconds, time.monotonic() - window_start, tail)


def run_gc(
    *,
    tree: TreeStore,
    rules: RetentionRules,
    api: RegistryApi,
    binary: Path,
    config: Path,
    env: Mapping[str, str],
    timeout: dt.timedelta,
    enter_readonly: Callable[[], None],
    leave_readonly: Callable[[], None],
    tag_delete: bool,
    refusal: str | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> GcReport:
    """Retention then collection; every failure ends up in the report, none escapes.

    ``refusal`` (from :func:`collection_refusal`) skips the collection, reported as an error;
    retention still runs. ``dry_run`` only plans.
    """
    started = now or dt.datetime.now(dt.UTC)
    # GC_TIMEOUT bounds the whole run: the snapshot, retention's deletes, the window.
    deadline = time.monotonic() + timeout.total_seconds()
    report = GcReport(started=started, dry_run=dry_run)
    try:
        _, report.plan = plan_run(tree, rules, started)
        if dry_run:
            report.result = "dry_run"
            return report
        report.apply = apply_plan(report.plan, api, tree, tag_delete=tag_delete, deadline=deadline)
        if report.apply.timed_out:
            raise GcTimeout(
                f"retention's deletes stopped: the run reached the "
                f"{timeout.total_seconds():.0f} s GC_TIMEOUT ({report.tags_removed} tag(s) "
                f"removed before it; no collection)"
            )
        if refusal is not None:
            report.errors.append(refusal)
            report.result = "refused"
            return report
        if not tree.list("repositories"):
            # Nothing was ever pushed: nothing to mark, and 3.x's garbage-collect fails on
            # the missing directory ("Path not found: /docker/registry/v2/repositories").
            report.collect = CollectResult(0, 0.0, 0.0, "no repository yet: nothing to collect")
            return report
        report.collect = collect(
            tree,
            binary=binary,
            config=config,
            env=env,
            timeout=timeout,
            enter_readonly=enter_readonly,
            leave_readonly=leave_readonly,
            deadline=deadline,
        )
    except GcTimeout as exc:
        report.errors.append(str(exc))
        report.result = "timeout"
    except Exception as exc:  # the report is the error channel: status, metrics, exit code
        report.errors.append(str(exc) or type(exc).__name__)
        report.result = "error"
    finally:
        report.finished = dt.datetime.now(dt.UTC)
    if report.result == "success" and not report.ok:
        report.result = "error"  # some deletes failed; the collection itself ran
    return report


def _is_signature_delete(delete: ManifestDelete) -> bool:
    return bool(delete.tags) and all(cosign_subject(t) for t in delete.tags)


def _children_in_plan(plan: Plan, tree: TreeStore) -> dict[tuple[str, str], set[str]]:
    """For each planned index, its children that the plan also deletes."""
    planned = {(d.repository, d.digest) for d in plan.delete_manifests}
    out: dict[tuple[str, str], set[str]] = {}
    for repo, digest in planned:
        hexdigest = digest.removeprefix("sha256:")
        try:
            manifest = parse_manifest(
                digest, tree.read(f"blobs/sha256/{hexdigest[:2]}/{hexdigest}/data")
            )
        except (FileNotFoundError, ValueError):
            continue
        children = {c for c in manifest.children if (repo, c) in planned}
        if children:
            out[(repo, digest)] = children
    return out


def _blocked(
    delete: ManifestDelete,
    parents: set[str],
    done: set[tuple[str, str]],
    planned: set[tuple[str, str]],
    api: RegistryApi,
    tree: TreeStore,
    deadline: _Deadline,
) -> dict[str, str] | None:
    """Why ``delete`` must not happen now (by tag, ``""`` for the rest), or None when
    everything is as it was selected."""
    repo = delete.repository
    if any((repo, parent) not in done for parent in parents):
        return {"": "the index listing it was kept"}
    for tag in delete.tags:
        subject = cosign_subject(tag)
        if subject and (repo, subject) in planned and (repo, subject) not in done:
            return {"": "the image it signs was kept"}
    try:
        moved = [
            t for t in delete.tags if api.manifest_digest(repo, t, deadline.left()) != delete.digest
        ]
    except (requests.RequestException, GcError) as exc:
        return {"": f"could not re-check: {exc}"}
    if moved:
        # The manifest is no longer only what was selected: it stays whole, untagged or not,
        # like any manifest retention did not select.
        reasons = {t: "moved since it was selected" for t in moved}
        reasons[""] = f"shares its manifest with {', '.join(moved)}, which moved"
        return reasons
    now_on_it = tags_pointing_at(tree, repo, delete.digest)
    if not now_on_it <= set(delete.tags):
        others = ", ".join(sorted(now_on_it - set(delete.tags)))
        return {"": f"tag {others} now points at the same manifest"}
    return None
