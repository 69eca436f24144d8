"""RETENTION_*/GC_* in the settings, and what they change in the registry's config."""

import datetime as dt
import json
from pathlib import Path

import pytest

from acme_registry.config import ConfigError, load_settings
from acme_registry.registry import readonly_config, render_config

BASE = {"ACME_DOMAINS": "registry.example.com", "REGISTRY_BINARY": "/bin/sh"}


def _error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, **env})
    return error.value


def test_off_by_default():
    gc = load_settings(BASE).gc
    assert not gc.retention.enabled
    assert gc.schedule.text == "off"
    assert gc.timeout == dt.timedelta(minutes=30)


def test_keep_rule_turns_the_default_schedule_on():
    gc = load_settings({**BASE, "RETENTION_KEEP_LAST": "5", "RETENTION_PROTECT": "latest"}).gc
    assert gc.retention.keep_last == 5
    assert gc.retention.protects("latest") and not gc.retention.protects("v1")
    assert gc.schedule.text == "daily@03:30"


def test_unknown_gc_name_is_refused_by_name():
    assert _error({"GC_SCHEDUL": "off"}).variable == "GC_SCHEDUL"
    assert _error({"RETENTION_KEEP": "3"}).variable == "RETENTION_KEEP"


def test_kubernetes_service_link_named_gc_is_ignored():
    assert load_settings({**BASE, "GC_PORT": "tcp://10.0.0.7:80"}).gc.schedule.text == "off"


@pytest.mark.parametrize(
    ("name", "value"),
    [("GC_SCHEDULE", "hourly"), ("RETENTION_KEEP_LAST", "-1"), ("GC_TIMEOUT", "soon")],
)
def test_bad_value_names_the_variable(name, value):
    assert _error({name: value}).variable == name


@pytest.mark.parametrize(
    "name",
    [
        "REGISTRY_STORAGE_MAINTENANCE",
        "REGISTRY_STORAGE_MAINTENANCE_READONLY_ENABLED",
        "registry_storage_maintenance_uploadpurging_enabled",
    ],
)
def test_maintenance_section_is_owned(name):
    error = _error({name: "true"})
    assert error.variable == name and "owns" in error.problem


def test_retention_with_delete_disabled_is_refused():
    error = _error({"RETENTION_KEEP_DAYS": "7", "REGISTRY_STORAGE_DELETE_ENABLED": "false"})
    assert error.variable == "REGISTRY_STORAGE_DELETE_ENABLED"


def test_retention_needs_filesystem_storage():
    error = _error({"RETENTION_KEEP_LAST": "3", "REGISTRY_STORAGE": "s3"})
    assert error.variable == "RETENTION_KEEP_LAST" and "filesystem" in error.problem


def test_collection_alone_works_on_other_storage():
    env = {**BASE, "GC_SCHEDULE": "every 6h", "REGISTRY_STORAGE": "s3", "STATE_STORE": "file"}
    assert load_settings(env).gc.schedule.text == "every 6h"


def test_retention_enables_delete_in_the_registry_config():
    on = load_settings({**BASE, "RETENTION_KEEP_LAST": "2"})
    config = render_config(on, "s", Path("/certs/live/tls.pem"), on.registry_env)
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["storage"]["filesystem"] == {"rootdirectory": "/var/lib/registry"}
    off = load_settings(BASE)
    assert "delete" not in render_config(off, "s", Path("/t"), off.registry_env)["storage"]


def test_readonly_config_adds_only_the_flag():
    settings = load_settings({**BASE, "RETENTION_KEEP_LAST": "2"})
    config = render_config(settings, "s", Path("/t"), settings.registry_env)
    config["storage"]["maintenance"] = {"uploadpurging": {"enabled": False}}
    readonly = readonly_config(config)
    assert readonly["storage"]["maintenance"] == {
        "uploadpurging": {"enabled": False},
        "readonly": {"enabled": True},
    }
    del readonly["storage"]["maintenance"]["readonly"]
    assert json.dumps(readonly, sort_keys=True) == json.dumps(config, sort_keys=True)


def test_retention_works_in_token_mode():
    """Its deletes go with tokens the agent mints (tokenmode.internal_token); the registry's
    storage.delete is on, as token mode and retention each need."""
    settings = load_settings({**BASE, "AUTH_MODE": "token", "RETENTION_KEEP_LAST": "5"})
    assert settings.gc.retention.keep_last == 5
    assert settings.token is not None
    config = render_config(settings, "s" * 32, Path("/tls.pem"), {}, None)
    assert config["storage"]["delete"] == {"enabled": True}
