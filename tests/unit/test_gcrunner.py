"""The pure parts of the agent's GC wiring: where the storage is, what the metrics count."""

import datetime as dt
from pathlib import Path

from prometheus_client import CollectorRegistry

from acme_registry import gc
from acme_registry.gcrunner import (
    GcMetrics,
    blob_descriptor_cache,
    filesystem_storage,
    redis_addr,
    storage_root,
)

T = dt.datetime(2026, 12, 1, 3, 30, tzinfo=dt.UTC)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_storage_root_default_and_from_the_environment():
    assert storage_root({}) == Path("/var/lib/registry")
    env = {"registry_storage_filesystem_rootdirectory": " /srv/reg "}
    assert storage_root(env) == Path("/srv/reg")


def test_filesystem_storage_and_cache():
    assert filesystem_storage({}) and filesystem_storage({"REGISTRY_STORAGE": "filesystem"})
    assert not filesystem_storage({"REGISTRY_STORAGE": "s3"})
    assert blob_descriptor_cache({"REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR": "redis"}) == "redis"
    assert blob_descriptor_cache({}) is None


def report(result: str, *, dry_run: bool = False) -> gc.GcReport:
    r = gc.GcReport(started=T, dry_run=dry_run, result=result, finished=T)
    r.apply.removed_tags = ["a:1", "a:2"]
    r.collect = gc.CollectResult(
        freed_bytes=1000, seconds=1.0, readonly_seconds=2.0, output_tail=""
    )
    return r


def test_metrics_count_runs_bytes_and_tags():
    registry = CollectorRegistry()
    metrics = GcMetrics(registry)
    assert value(registry, "acme_registry_gc_runs_total", result="timeout") == 0
    metrics.record(report("success"))
    metrics.record(report("timeout"))
    assert value(registry, "acme_registry_gc_runs_total", result="success") == 1
    assert value(registry, "acme_registry_gc_runs_total", result="timeout") == 1
    assert value(registry, "acme_registry_gc_freed_bytes_total") == 2000
    assert value(registry, "acme_registry_retention_removed_tags_total") == 4
    assert value(registry, "acme_registry_gc_last_success_timestamp_seconds") == T.timestamp()


def test_a_dry_run_counts_nothing():
    registry = CollectorRegistry()
    GcMetrics(registry).record(report("dry_run", dry_run=True))
    assert value(registry, "acme_registry_retention_removed_tags_total") == 0
    assert value(registry, "acme_registry_gc_runs_total", result="success") == 0


def test_redis_addr_from_either_form():
    assert redis_addr({}) is None and redis_addr({"REGISTRY_REDIS_ADDR": " "}) is None
    assert redis_addr({"REGISTRY_REDIS_ADDR": "r:6379"}) == "r:6379"
    assert redis_addr({"registry_redis_addrs": "[r:6379]"}) == "[r:6379]"
