"""Which tags and manifests retention removes, and the bytes a collection then frees (pure).

Per repository that ``RETENTION_REPOSITORIES`` matches:

- protected tags (``RETENTION_PROTECT``) are never removed and are not counted;
- cosign tags (``sha256-<hex>.sig|.att|.sbom``) are not counted either: they follow their
  subject, removed exactly when the manifest they sign is deleted by this plan, kept
  otherwise (an unknown or untagged subject included: what retention did not select stays);
- every other tag is ranked newest first by when it last moved; it is removed only when every
  set rule allows it: ``KEEP_LAST`` allows ranks past N, ``KEEP_DAYS`` allows tags pushed
  more than D days before ``now``.

A manifest is deleted only when every tag on it is removed, no kept manifest (an index)
lists it, and it is not already untagged: manifests retention never selected, such as a
previous ``latest`` or an image pinned by digest, stay. The untagged children of a deleted
index go with it, unless something kept lists them too. A removed tag whose manifest stays
(another tag or an index keeps it) is an "untag only": registry 3.x can delete the tag,
2.8 cannot (it deletes by digest only) and keeps it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from .gcconfig import RetentionRules
from .registrytree import Snapshot, Tag

COSIGN_TAG = re.compile(r"sha256-([0-9a-f]{64})\.(sig|att|sbom)")


@dataclass(frozen=True)
class Decision:
    tag: Tag
    remove: bool
    reason: str


@dataclass(frozen=True)
class ManifestDelete:
    repository: str
    digest: str
    tags: tuple[str, ...]  # the tags that go with it (all selected)


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]  # every tag of every repository retention applies to
    delete_manifests: tuple[ManifestDelete, ...]  # an index always before its children
    untag_only: tuple[Tag, ...]  # removed tags whose manifest stays
    remaining: dict[str, frozenset[str]]  # manifests present per repository afterwards
    freed_bytes: int  # blobs only the deleted manifests referenced
    unreferenced_bytes: int  # blobs nothing referenced already: collection frees them too

    @property
    def removed_tags(self) -> tuple[Tag, ...]:
        return tuple(d.tag for d in self.decisions if d.remove)

    @property
    def collectable_bytes(self) -> int:
        """What a collection right after this plan frees in all."""
        return self.freed_bytes + self.unreferenced_bytes


@dataclass(frozen=True)
class _RepositoryPlan:
    decisions: tuple[Decision, ...]
    delete_manifests: tuple[ManifestDelete, ...]
    untag_only: tuple[Tag, ...]
    remaining: frozenset[str]


def cosign_subject(tag: str) -> str | None:
    """``sha256:<hex>`` signed or attested by a cosign tag, or None for any other tag."""
    match = COSIGN_TAG.fullmatch(tag)
    return f"sha256:{match[1]}" if match else None


def plan_retention(snapshot: Snapshot, rules: RetentionRules, now: dt.datetime) -> Plan:
    """Select what to remove. ``now`` (aware) is the instant KEEP_DAYS counts back from."""
    decisions: list[Decision] = []
    deletes: list[ManifestDelete] = []
    untag_only: list[Tag] = []
    remaining = dict(snapshot.revisions)
    if rules.enabled:
        for repo in snapshot.repositories:
            if not rules.applies_to(repo):
                continue
            result = _plan_repository(snapshot, repo, rules, now)
            decisions.extend(result.decisions)
            deletes.extend(result.delete_manifests)
            untag_only.extend(result.untag_only)
            remaining[repo] = result.remaining
    before = snapshot.unreferenced_bytes()
    return Plan(
        decisions=tuple(decisions),
        delete_manifests=tuple(deletes),
        untag_only=tuple(untag_only),
        remaining=remaining,
        freed_bytes=snapshot.unreferenced_bytes(remaining) - before,
        unreferenced_bytes=before,
    )


def _plan_repository(
    snapshot: Snapshot, repo: str, rules: RetentionRules, now: dt.datetime
) -> _RepositoryPlan:
    tags = snapshot.tags_of(repo)
    reasons: dict[str, str] = {}
    removed: set[str] = set()
    signatures: list[Tag] = []
    ranked: list[Tag] = []
    for tag in tags:
        if rules.protects(tag.name):
            reasons[tag.name] = "protected"
        elif cosign_subject(tag.name) is not None:
            signatures.append(tag)
        else:
            ranked.append(tag)

    ranked.sort(key=lambda t: (t.pushed, t.name), reverse=True)
    cutoff = None if rules.keep_days is None else now - dt.timedelta(days=rules.keep_days)
    for rank, tag in enumerate(ranked):
        if rules.keep_last is not None and rank < rules.keep_last:
            reasons[tag.name] = f"among the {rules.keep_last} newest"
        elif cutoff is not None and tag.pushed >= cutoff:
            reasons[tag.name] = f"pushed within {rules.keep_days} days"
        else:
            reasons[tag.name] = "selected"
            removed.add(tag.name)

    present = snapshot.revisions.get(repo, frozenset())
    deleted: set[str] = set()
    # Signatures follow what their subject becomes, and a signature's own manifest may then
    # be deleted, so decide until nothing changes (two rounds in practice).
    while True:
        deleted = _deleted_manifests(snapshot, tags, removed, present)
        changed = False
        for sig in signatures:
            if sig.name not in removed and cosign_subject(sig.name) in deleted:
                removed.add(sig.name)
                changed = True
        if not changed:
            break
    for sig in signatures:
        if sig.name in removed:
            reasons[sig.name] = "signature of a removed image"
        else:
            reasons[sig.name] = "signature of a kept image"

    by_digest: dict[str, list[str]] = {}
    for tag in tags:
        by_digest.setdefault(tag.digest, []).append(tag.name)
    ordered = _parents_first(snapshot, deleted)
    return _RepositoryPlan(
        decisions=tuple(
            Decision(t, t.name in removed, reasons[t.name])
            for t in sorted(tags, key=lambda t: (t.pushed, t.name), reverse=True)
        ),
        delete_manifests=tuple(
            ManifestDelete(repo, d, tuple(sorted(by_digest.get(d, [])))) for d in ordered
        ),
        untag_only=tuple(t for t in tags if t.name in removed and t.digest not in deleted),
        remaining=present - deleted,
    )


def _deleted_manifests(
    snapshot: Snapshot, tags: list[Tag], removed: set[str], present: frozenset[str]
) -> set[str]:
    kept_digests = {t.digest for t in tags if t.name not in removed}
    tagged = {t.digest for t in tags}
    roots = {t.digest for t in tags if t.name in removed} - kept_digests
    candidates: set[str] = set()
    pending = list(roots)
    while pending:
        digest = pending.pop()
        if digest in candidates or digest not in present:
            continue
        candidates.add(digest)
        manifest = snapshot.manifests.get(digest)
        if manifest is not None:
            # An index's untagged children go with it; a tagged child has its own decision.
            pending.extend(c for c in manifest.children if c not in tagged)
    survivors = present - candidates
    still_listed = _closure(snapshot, survivors)
    return candidates - still_listed


def _closure(snapshot: Snapshot, digests: set[str] | frozenset[str]) -> set[str]:
    seen: set[str] = set()
    pending = list(digests)
    while pending:
        digest = pending.pop()
        if digest in seen:
            continue
        seen.add(digest)
        manifest = snapshot.manifests.get(digest)
        if manifest is not None:
            pending.extend(manifest.children)
    return seen


def _parents_first(snapshot: Snapshot, digests: set[str]) -> list[str]:
    """``digests`` ordered so that an index comes before its children: a delete never leaves
    an index pointing at a manifest that is gone."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(digest: str) -> None:
        if digest in seen:
            return
        seen.add(digest)
        manifest = snapshot.manifests.get(digest)
        for child in manifest.children if manifest else ():
            if child in digests:
                visit(child)
        order.append(digest)

    for digest in sorted(digests):
        visit(digest)
    return list(reversed(order))
