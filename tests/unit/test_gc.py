"""The pure parts of a GC run: version detection, the several-replicas refusal, the dry run."""

from __future__ import annotations

import datetime as dt

import pytest

from acme_registry.gc import GcError, collection_refusal, describe_plan, supports_tag_delete
from acme_registry.gcconfig import Pattern, RetentionRules
from acme_registry.registrytree import take_snapshot
from acme_registry.retention import plan_retention
from tests.support.memtree import EPOCH, MemoryTree


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("github.com/docker/distribution 2.8.2+ds1", False),
        ("/bin/registry github.com/distribution/distribution v2.8.3", False),
        ("/opt/registry3/registry github.com/distribution/distribution/v3 v3.1.1", True),
        ("registry github.com/distribution/distribution/v3 v3.0.0-rc.1", True),
    ],
)
def test_tag_delete_from_the_version(output, expected):
    assert supports_tag_delete(output) is expected


def test_unreadable_version_is_an_error():
    with pytest.raises(GcError):
        supports_tag_delete("registry: unknown flag --version")


def test_refusal_with_several_replicas():
    assert collection_refusal(shared_state_store=None, blob_descriptor_cache=None) is None
    assert collection_refusal(shared_state_store=None, blob_descriptor_cache="inmemory") is None
    assert (
        collection_refusal(shared_state_store=None, blob_descriptor_cache=None, redis_addr=" ")
        is None
    )
    shared = collection_refusal(shared_state_store="s3", blob_descriptor_cache=None)
    assert shared is not None and "STATE_STORE=s3 is shared by several replicas" in shared
    redis = collection_refusal(shared_state_store=None, blob_descriptor_cache=" Redis ")
    assert redis is not None and "Redis" in redis and "\n" not in redis
    addr = collection_refusal(
        shared_state_store=None, blob_descriptor_cache=None, redis_addr="10.0.0.5:6379"
    )
    assert addr == redis


def test_describe_plan_says_what_2x_cannot_do():
    tree = MemoryTree()
    old = tree.image("app", [("old", 500)], "old")
    new = tree.image("app", [("new", 600)], "new")
    tree.tag("app", "b1", old, EPOCH)
    tree.tag("app", "stable", old, EPOCH + dt.timedelta(hours=1))
    tree.tag("app", "b2", new, EPOCH + dt.timedelta(hours=2))
    rules = RetentionRules(keep_last=1)
    plan = plan_retention(take_snapshot(tree), rules, EPOCH + dt.timedelta(days=1))
    v2 = describe_plan(plan, tag_delete=False)
    v3 = describe_plan(plan, tag_delete=True)
    assert v2[0].startswith("keep  (among the 1 newest): app:b2 ")
    assert any(line.startswith("remove (selected): app:b1 ") for line in v2)
    assert v2[-1].startswith("1 manifests to delete; collection would free ")
    assert v3 == v2  # both tags of the old image were selected: its manifest goes on both


def test_describe_plan_untag_only_differs_between_2x_and_3x():
    tree = MemoryTree()
    old = tree.image("app", [("old", 500)], "old")
    tree.tag("app", "b1", old, EPOCH)
    tree.tag("app", "stable", old, EPOCH)
    tree.tag("app", "b2", tree.image("app", [("new", 600)], "new"), EPOCH + dt.timedelta(hours=2))
    rules = RetentionRules(keep_last=1, protect=(Pattern("stable"),))
    plan = plan_retention(take_snapshot(tree), rules, EPOCH + dt.timedelta(days=1))
    assert [t.name for t in plan.untag_only] == ["b1"]
    b1_v2 = [line for line in describe_plan(plan, tag_delete=False) if "app:b1 " in line]
    b1_v3 = [line for line in describe_plan(plan, tag_delete=True) if "app:b1 " in line]
    assert b1_v2[0].startswith("keep  (its manifest stays and registry 2.x deletes by digest")
    assert b1_v3[0].startswith("remove (selected)")
