"""Socket activation, the pure parts: which binaries have it, the setting, how many
generations supervisord.conf defines."""

from pathlib import Path

import pytest

from acme_registry.activation import (
    ActivationUnsupported,
    RegistryVersion,
    choose,
    parse_version,
)
from acme_registry.config import ConfigError, load_settings
from acme_registry.registry import generation_count, supervisord_conf

BASE = {"ACME_DOMAINS": "registry.example.com", "REGISTRY_BINARY": "/bin/sh"}
V3 = RegistryVersion("github.com/distribution/distribution/v3", "v3.1.1", 3)
V2 = RegistryVersion("github.com/docker/distribution", "2.8.2+ds1", 2)


def test_registry_3x_version_line():
    assert parse_version("registry github.com/distribution/distribution/v3 v3.1.1\n") == V3


def test_debian_2_8_version_line():
    found = parse_version("/usr/bin/docker-registry github.com/docker/distribution 2.8.2+ds1\n")
    assert found == V2
    assert not found.socket_activation


@pytest.mark.parametrize(
    ("output", "major"),
    [
        # A local build without version ldflags: the module path still says 3.
        ("registry github.com/distribution/distribution/v3 (devel)", 3),
        ("registry github.com/distribution/distribution/v3", 3),
        ("registry github.com/distribution/distribution/v3 v3.0.0-rc.3+unknown", 3),
        # The module path wins over a version string a packager rewrote.
        ("registry github.com/distribution/distribution/v3 2.99", 3),
        # 2.8.3, the last 2.x, and 2.x built from the renamed repository.
        ("registry github.com/docker/distribution v2.8.3", 2),
        ("registry github.com/distribution/distribution v2.8.3", 2),
        # A hypothetical 4.x keeps activation.
        ("registry github.com/distribution/distribution/v4 v4.0.0", 4),
        # Warnings before the line (3.x logs OpenTelemetry notices on stderr).
        ("level=warning msg=otel\nregistry github.com/distribution/distribution/v3 v3.1.1", 3),
    ],
)
def test_odd_but_recognisable_version_lines(output, major):
    found = parse_version(output)
    assert found is not None and found.major == major
    assert found.socket_activation == (major >= 3)


@pytest.mark.parametrize(
    "output",
    [
        "",
        "Usage: registry [command]",
        "flag provided but not defined: -version",
        "registry github.com/docker/distribution (devel)",
        "registry example.com/other/distribution v3.1.1",
        "sh: 0: Illegal option --",
    ],
)
def test_unrecognisable_version_output(output):
    assert parse_version(output) is None


def test_auto_uses_activation_only_for_a_known_3x():
    assert choose("auto", V3) is True
    assert choose("auto", V2) is False
    assert choose("auto", None) is False  # unknown: the FIFO handover works with any release


def test_off_never_and_on_trusts_an_unknown_binary():
    assert choose("off", V3) is False
    assert choose("on", V3) is True
    assert choose("on", None) is True


def test_on_with_a_2x_binary_is_refused():
    with pytest.raises(ActivationUnsupported) as refused:
        choose("on", V2)
    assert str(refused.value) == (
        "on, but the registry binary is github.com/docker/distribution 2.8.2+ds1: only 3.x "
        "serves on an inherited socket (use auto or off)"
    )


def test_setting_defaults_to_auto_and_takes_on_off_in_any_case():
    assert load_settings(BASE).socket_activation == "auto"
    assert load_settings({**BASE, "REGISTRY_SOCKET_ACTIVATION": " Off "}).socket_activation == "off"
    assert load_settings({**BASE, "REGISTRY_SOCKET_ACTIVATION": "ON"}).socket_activation == "on"


@pytest.mark.parametrize("value", ["yes", "true", "1", "systemd"])
def test_setting_refuses_other_values(value):
    with pytest.raises(ConfigError) as error:
        load_settings({**BASE, "REGISTRY_SOCKET_ACTIVATION": value})
    assert error.value.variable == "REGISTRY_SOCKET_ACTIVATION"
    assert str(error.value) == (
        f"REGISTRY_SOCKET_ACTIVATION: {value!r} is not one of: auto, on, off"
    )


def test_setting_is_never_passed_to_the_registry():
    env = {**BASE, "REGISTRY_SOCKET_ACTIVATION": "off", "REGISTRY_LOG_LEVEL": "debug"}
    assert load_settings(env).registry_env == {"REGISTRY_LOG_LEVEL": "debug"}


def test_generations_are_numprocs_of_the_packaged_supervisord_conf():
    text = supervisord_conf().read_text()
    assert "numprocs=3" in text
    assert generation_count(text) == 3


def test_generation_count_reads_numprocs_of_the_registry_program_only():
    text = (
        "[program:other]\nnumprocs=9\n"
        "[program:registry]\ncommand=/bin/sh -c '%(ENV_X)s'\nnumprocs=4 ; more\n"
    )
    assert generation_count(text) == 4
    with pytest.raises(ValueError, match="at least 2"):
        generation_count("[program:registry]\nnumprocs=1\n")


def test_the_wrapper_module_imports_only_the_standard_library():
    # It runs once per generation, before the registry: it must stay quick to start.
    source = Path(__file__).resolve().parents[2] / "src" / "acme_registry" / "activation.py"
    imports = [
        line.split()[1]
        for line in source.read_text().splitlines()
        if line.startswith(("import ", "from "))
    ]
    assert all(not name.startswith(".") and name != "acme_registry" for name in imports)
