"""Snapshots of synthetic storage trees and the retention plan computed from them."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acme_registry.gcconfig import Pattern, RetentionRules
from acme_registry.registrytree import (
    parse_manifest,
    tag_digest,
    tags_pointing_at,
    take_snapshot,
)
from acme_registry.retention import cosign_subject, plan_retention
from tests.support.memtree import EPOCH, MemoryTree

NOW = EPOCH + dt.timedelta(days=100)


def day(n: float) -> dt.datetime:
    return EPOCH + dt.timedelta(days=n)


def rules(**kwargs) -> RetentionRules:
    protect = tuple(Pattern(p) for p in kwargs.pop("protect", ()))
    repos = tuple(Pattern(p) for p in kwargs.pop("repositories", ("*",)))
    return RetentionRules(protect=protect, repositories=repos, **kwargs)


def ci_history(tree: MemoryTree, repo: str, count: int) -> dict[str, str]:
    """``count`` builds tagged b1..bN a day apart: a shared base layer, a unique app layer."""
    digests = {}
    for n in range(1, count + 1):
        digest = tree.image(repo, [("base", 5000), (f"{repo}-app-{n}", 1000 + n)], f"{repo}{n}")
        tree.tag(repo, f"b{n}", digest, day(n))
        digests[f"b{n}"] = digest
    return digests


def removed(plan) -> set[str]:
    return {t.ref for t in plan.removed_tags}


def test_snapshot_reads_tags_revisions_and_sizes():
    tree = MemoryTree()
    digest = tree.image("team/app/web", [("l1", 300)])
    tree.tag("team/app/web", "v1", digest, day(3))
    snap = take_snapshot(tree)
    assert snap.repositories == ("team/app/web",)
    (tag,) = snap.tags
    assert (tag.ref, tag.digest, tag.pushed) == ("team/app/web:v1", digest, day(3))
    assert snap.revisions["team/app/web"] == {digest}
    manifest = snap.manifests[digest]
    assert len(manifest.blobs) == 2 and not manifest.is_index
    assert snap.total_bytes == sum(len(d) for p, (d, _) in tree.files.items() if "/data" in p)
    assert snap.unreferenced_bytes() == 0
    assert tag_digest(tree, "team/app/web", "v1") == digest
    assert tag_digest(tree, "team/app/web", "v2") is None
    assert tags_pointing_at(tree, "team/app/web", digest) == {"v1"}


def test_a_deleted_revision_keeps_its_directory_but_not_its_link():
    tree = MemoryTree()
    digest = tree.image("app", [("l1", 10)])
    hexdigest = digest.removeprefix("sha256:")
    del tree.files[f"repositories/app/_manifests/revisions/sha256/{hexdigest}/link"]
    tree.write(f"repositories/app/_manifests/revisions/sha256/{hexdigest}/other", b"")
    assert take_snapshot(tree).revisions["app"] == frozenset()


def test_parse_manifest_shapes():
    d = "sha256:" + "a" * 64
    c = "sha256:" + "b" * 64
    index = parse_manifest(d, json.dumps({"manifests": [{"digest": c}]}).encode())
    assert index.is_index and index.children == (c,)
    image = parse_manifest(d, json.dumps({"config": {"digest": c}, "layers": []}).encode())
    assert image.blobs == (c,) and not image.is_index
    schema1 = parse_manifest(d, json.dumps({"fsLayers": [{"blobSum": c}]}).encode())
    assert schema1.blobs == (c,)
    with pytest.raises(ValueError):
        parse_manifest(d, b"not json")
    with pytest.raises(ValueError):
        parse_manifest(d, b'{"hello": 1}')


def test_keep_last_with_protect_latest():
    tree = MemoryTree()
    digests = ci_history(tree, "ci/app", 10)
    tree.tag("ci/app", "latest", digests["b2"], day(50))  # an old build protected by name
    plan = plan_retention(take_snapshot(tree), rules(keep_last=3, protect=["latest"]), NOW)
    assert removed(plan) == {f"ci/app:b{n}" for n in range(1, 8)}
    # b2 is selected, but its manifest is also the protected latest's: untag only.
    assert [t.name for t in plan.untag_only] == ["b2"]
    assert {d.digest for d in plan.delete_manifests} == {
        digests[f"b{n}"] for n in (1, 3, 4, 5, 6, 7)
    }
    reasons = {d.tag.name: d.reason for d in plan.decisions}
    assert reasons["latest"] == "protected"
    assert reasons["b10"] == reasons["b8"] == "among the 3 newest"
    assert reasons["b7"] == "selected"


def test_protected_tags_are_not_counted():
    tree = MemoryTree()
    digests = ci_history(tree, "app", 6)
    tree.tag("app", "latest", digests["b6"], day(6))
    plan = plan_retention(take_snapshot(tree), rules(keep_last=2, protect=["latest"]), NOW)
    # b6 and b5 are the 2 newest unprotected tags; latest rides on b6 without counting.
    assert removed(plan) == {"app:b1", "app:b2", "app:b3", "app:b4"}


def test_untag_only_when_another_kept_tag_shares_the_manifest():
    tree = MemoryTree()
    digests = ci_history(tree, "app", 4)
    tree.tag("app", "stable", digests["b1"], day(1.5))
    plan = plan_retention(take_snapshot(tree), rules(keep_last=3), NOW)
    # stable (pushed on day 1.5) ranks 4th behind b4, b3, b2.
    assert removed(plan) == {"app:b1", "app:stable"}
    plan = plan_retention(take_snapshot(tree), rules(keep_last=3, protect=["stable"]), NOW)
    assert removed(plan) == {"app:b1"}
    assert [t.name for t in plan.untag_only] == ["b1"]
    assert plan.delete_manifests == ()
    assert plan.freed_bytes == 0


def test_every_set_rule_must_allow_removal():
    tree = MemoryTree()
    ci_history(tree, "app", 10)  # pushed on days 1..10
    now = day(12)
    assert removed(plan_retention(take_snapshot(tree), rules(keep_days=5), now)) == {
        f"app:b{n}" for n in range(1, 7)
    }
    both = rules(keep_last=8, keep_days=5)
    assert removed(plan_retention(take_snapshot(tree), both, now)) == {"app:b1", "app:b2"}
    both = rules(keep_last=2, keep_days=5)
    assert removed(plan_retention(take_snapshot(tree), both, now)) == {
        f"app:b{n}" for n in range(1, 7)
    }


def test_repositories_filter_and_no_rules():
    tree = MemoryTree()
    ci_history(tree, "ci/app", 4)
    ci_history(tree, "release/app", 4)
    plan = plan_retention(take_snapshot(tree), rules(keep_last=1, repositories=["ci/*"]), NOW)
    assert removed(plan) == {"ci/app:b1", "ci/app:b2", "ci/app:b3"}
    assert all(d.tag.repository == "ci/app" for d in plan.decisions)
    off = plan_retention(take_snapshot(tree), rules(protect=["latest"]), NOW)
    assert off.decisions == () and off.delete_manifests == () and off.freed_bytes == 0


def test_freed_bytes_are_the_blobs_only_removed_manifests_reference():
    tree = MemoryTree()
    ci_history(tree, "one", 3)
    ci_history(tree, "two", 3)  # shares the base layer with "one"
    snap = take_snapshot(tree)
    plan = plan_retention(snap, rules(keep_last=1, repositories=["one"]), NOW)
    manifest_bytes = sum(snap.blob_sizes[d.digest] for d in plan.delete_manifests)
    # Per removed build: its manifest, its config (100 bytes), its unique layer; never "base".
    assert plan.freed_bytes == manifest_bytes + 2 * 100 + (1001 + 1002)
    assert plan.unreferenced_bytes == 0
    assert plan.collectable_bytes == plan.freed_bytes


def test_already_unreferenced_blobs_are_reported_apart():
    tree = MemoryTree()
    ci_history(tree, "app", 2)
    tree.layer("orphan-upload", 777)
    plan = plan_retention(take_snapshot(tree), rules(keep_last=5), NOW)
    assert plan.freed_bytes == 0
    assert plan.unreferenced_bytes == 777


def test_multi_arch_index_with_untagged_children_survives():
    tree = MemoryTree()
    amd = tree.image("app", [("amd64", 2000)], "amd")
    arm = tree.image("app", [("arm64", 2100)], "arm")
    multi = tree.index("app", [amd, arm])
    tree.tag("app", "multi", multi, day(20))
    ci_history(tree, "app", 3)  # b1..b3 pushed on days 1..3: older than the index
    plan = plan_retention(take_snapshot(tree), rules(keep_last=1), NOW)
    assert removed(plan) == {"app:b1", "app:b2", "app:b3"}
    assert plan.remaining["app"] >= {multi, amd, arm}
    assert not {amd, arm, multi} & {d.digest for d in plan.delete_manifests}


def test_a_removed_index_takes_its_untagged_children_parents_first():
    tree = MemoryTree()
    amd = tree.image("app", [("amd64", 2000)], "amd")
    arm = tree.image("app", [("arm64", 2100)], "arm")
    old = tree.index("app", [amd, arm])
    tree.tag("app", "old", old, day(1))
    shared_amd = amd  # the new index lists the same amd64 image: it must stay
    new_arm = tree.image("app", [("arm64-v2", 2200)], "arm2")
    new = tree.index("app", [shared_amd, new_arm])
    tree.tag("app", "new", new, day(2))
    pinned = tree.image("app", [("pinned", 900)], "pinned")  # untagged, pinned by digest
    plan = plan_retention(take_snapshot(tree), rules(keep_last=1), NOW)
    assert [d.digest for d in plan.delete_manifests] == [old, arm]
    assert plan.delete_manifests[0].tags == ("old",)
    assert plan.delete_manifests[1].tags == ()
    assert {amd, new_arm, new, pinned} <= plan.remaining["app"]
    assert plan.freed_bytes > 2100  # arm64 layer, its config and both manifests


def test_cosign_tags_follow_their_subject_and_are_not_counted():
    tree = MemoryTree()
    digests = ci_history(tree, "app", 3)

    def sign(subject: str, suffix: str, pushed: dt.datetime) -> str:
        sig = tree.image("app", [(f"sig-{subject}-{suffix}", 50)], f"sig-{subject}{suffix}")
        tree.tag("app", f"sha256-{subject.removeprefix('sha256:')}.{suffix}", sig, pushed)
        return sig

    # Signatures pushed after every build: counted, they would push builds out of KEEP_LAST.
    sig_old = sign(digests["b1"], "sig", day(30))
    att_old = sign(digests["b1"], "att", day(30))
    sig_new = sign(digests["b3"], "sig", day(31))
    orphan = sign("sha256:" + "c" * 64, "sig", day(1))  # subject unknown: never selected
    plan = plan_retention(take_snapshot(tree), rules(keep_last=2), NOW)
    b1 = digests["b1"].removeprefix("sha256:")
    assert removed(plan) == {"app:b1", f"app:sha256-{b1}.sig", f"app:sha256-{b1}.att"}
    deleted = {d.digest for d in plan.delete_manifests}
    assert deleted == {digests["b1"], sig_old, att_old}
    assert {sig_new, orphan} <= plan.remaining["app"]
    reasons = {d.tag.name: d.reason for d in plan.decisions}
    assert reasons[f"sha256-{b1}.sig"] == "signature of a removed image"
    assert reasons[f"sha256-{digests['b3'].removeprefix('sha256:')}.sig"] == (
        "signature of a kept image"
    )


def test_cosign_subject_form():
    hexdigest = "d" * 64
    assert cosign_subject(f"sha256-{hexdigest}.sbom") == f"sha256:{hexdigest}"
    assert cosign_subject(f"sha256-{hexdigest}.txt") is None
    assert cosign_subject("sha256-abc.sig") is None
    assert cosign_subject("latest") is None


def test_ties_in_push_time_break_by_name():
    tree = MemoryTree()
    for name in ("a", "b", "c"):
        tree.tag("app", name, tree.image("app", [(name, 10)], name), day(1))
    plan = plan_retention(take_snapshot(tree), rules(keep_last=2), NOW)
    assert removed(plan) == {"app:a"}


@st.composite
def random_trees(draw):
    """Images sharing layers, indexes over some of them, tags (some moved onto one manifest),
    cosign tags, across two repositories."""
    tree = MemoryTree()
    for repo in ("a", "b/c"):
        images = []
        for i in range(draw(st.integers(1, 6))):
            layers = draw(st.lists(st.sampled_from(["l0", "l1", "l2", f"{repo}{i}"]), max_size=3))
            images.append(
                tree.image(repo, [(name, 100 + len(name)) for name in layers], f"{repo}{i}")
            )
        manifests = list(images)
        for _ in range(draw(st.integers(0, 2))):
            children = draw(st.lists(st.sampled_from(images), min_size=1, max_size=3, unique=True))
            manifests.append(tree.index(repo, children))
        for t in range(draw(st.integers(0, 8))):
            target = draw(st.sampled_from(manifests))
            name = draw(st.sampled_from([f"t{t}", "latest", f"v{t}"]))
            tree.tag(repo, name, target, day(draw(st.integers(0, 50))))
        for target in draw(st.lists(st.sampled_from(manifests), max_size=2)):
            sig = tree.image(repo, [(f"sig-{target}", 10)], f"sig-{target}")
            tree.tag(repo, f"sha256-{target.removeprefix('sha256:')}.sig", sig, day(60))
    rules = RetentionRules(
        keep_last=draw(st.one_of(st.none(), st.integers(1, 4))),
        keep_days=draw(st.one_of(st.none(), st.integers(1, 80))),
        protect=tuple(Pattern(p) for p in draw(st.lists(st.sampled_from(["latest", "v*"])))),
    )
    return tree, rules


@settings(max_examples=150, deadline=None)
@given(random_trees())
def test_plan_invariants(case):
    tree, rules = case
    snap = take_snapshot(tree)
    plan = plan_retention(snap, rules, NOW)
    deleted = {(d.repository, d.digest) for d in plan.delete_manifests}
    removed_refs = {t.ref for t in plan.removed_tags}
    for decision in plan.decisions:
        tag = decision.tag
        if rules.protects(tag.name):
            assert not decision.remove
        if not decision.remove:
            # A kept tag's manifest is never deleted.
            assert (tag.repository, tag.digest) not in deleted
    for repo, remaining in plan.remaining.items():
        # Whatever a surviving manifest lists survives with it.
        for digest in remaining:
            for child in snap.manifests[digest].children:
                assert child in remaining
        # Every tag left points at a manifest that is still there.
        for tag in snap.tags_of(repo):
            if tag.ref not in removed_refs:
                assert tag.digest in remaining
    # Deleted manifests had tags only among the removed ones, or none (index children).
    for d in plan.delete_manifests:
        assert {f"{d.repository}:{t}" for t in d.tags} <= removed_refs
    # Untagged manifests that no deleted index listed are never deleted.
    listed = {c for _, digest in deleted for c in snap.manifests[digest].children}
    tagged = {(t.repository, t.digest) for t in snap.tags}
    for repo, digest in deleted:
        assert (repo, digest) in tagged or digest in listed
    assert plan.freed_bytes >= 0
    assert plan.freed_bytes + plan.unreferenced_bytes == snap.unreferenced_bytes(plan.remaining)
