"""Where token mode's extra registry CPU goes: the registry with small changes to its config or
to the token, side by side, measured as CPU time per request (issue 11).

Each variant is its own registry process on one storage, TLS from one local CA, pinned as
bench.auth_rate pins (servers on the first half of the cores, curl clients on the rest),
measured in alternating rounds by bench.auth_rate's clients. Variants (``--variants``, comma
separated; the first is the baseline of the table):

- ``none``: no ``auth``, the bench's registry config (``log.level`` info, the access log on);
- ``token``: ``auth.token`` as the agent renders it (:func:`tokenconfig.registry_token_config`),
  the token naming its key as the agent's do for that binary (``kid`` for 3.x, ``x5c`` for 2.8);
- a ``+`` suffix changes one thing: ``+warn`` sets ``log.level: warn`` (3.x writes an info
  line per request, and one more per authenticated request), ``+x5c`` / ``+kid`` names the key
  the other way, ``+es256`` sets ``auth.token.signingalgorithms: [ES256]``, ``+minimal`` signs
  only ``iss``, ``aud``, ``exp`` and ``access``.

No token service runs here: the tokens are signed directly with a fresh keyring, with the
claims the service gives (one pull grant on the bench repository).

Run: .venv/bin/python -m bench.auth_config --binary /opt/registry3/registry
     [--variants none,token,token+warn,none+warn] [--seconds 8] [--rounds 6] [--no-pin]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acme_registry import tokenconfig
from acme_registry.tokenmode import registry_key_reference
from acme_registry.tokens import KeyReference, Keyring, access_claims
from bench.auth_rate import (
    REPOSITORY,
    Pinning,
    Sample,
    Target,
    _Registry,
    _wait_https,
    sample_target,
)
from bench.setups import REGISTRY_BINARY
from tests.support.clients import Skopeo
from tests.support.oci import make_oci_image
from tests.support.ports import free_ports
from tests.support.tls import TestCA
from tests.support.tokenauth import ISSUER, NAME

DEFAULT_VARIANTS = ("none", "token", "token+warn", "none+warn")
CHANGES = ("warn", "x5c", "kid", "es256", "minimal")
_MINIMAL_CLAIMS = ("iss", "aud", "exp", "access")


@dataclass(frozen=True)
class Variant:
    """One registry configuration (and token) to measure."""

    name: str
    token: bool
    changes: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        base, *changes = text.strip().split("+")
        if base not in ("none", "token"):
            raise ValueError(f"{text!r}: a variant starts with none or token")
        unknown = set(changes) - set(CHANGES)
        if unknown:
            raise ValueError(f"{text!r}: unknown change {sorted(unknown)[0]!r}")
        if base == "none" and set(changes) - {"warn"}:
            raise ValueError(f"{text!r}: only +warn applies without a token")
        return cls(text.strip(), base == "token", frozenset(changes))


def token_auth(variant: Variant, bundle: Path) -> dict[str, Any]:
    """The ``auth`` section: the agent's, plus the variant's change."""
    settings = tokenconfig.load_token_settings({"TOKEN_ADDR": "127.0.0.1:5001"}, (NAME,))
    auth: dict[str, Any] = tokenconfig.registry_token_config(settings, bundle)["auth"]
    if "es256" in variant.changes:
        auth["token"]["signingalgorithms"] = ["ES256"]
    return auth


def signed_token(variant: Variant, keyring: Keyring, binary: Path, now: dt.datetime) -> str:
    claims = access_claims(
        issuer=ISSUER,
        subject="bench",
        audience=NAME,
        access=[{"type": "repository", "name": REPOSITORY, "actions": ["pull"]}],
        now=now,
        ttl=dt.timedelta(hours=6),
    )
    if "minimal" in variant.changes:
        claims = {key: claims[key] for key in _MINIMAL_CLAIMS}
    reference = registry_key_reference(binary)
    if "x5c" in variant.changes:
        reference = KeyReference.X5C
    elif "kid" in variant.changes:
        reference = KeyReference.KID
    return keyring.current.sign(claims, reference)


def run(
    workdir: Path,
    binary: Path,
    variants: Sequence[Variant],
    seconds: float,
    rounds: int,
    pinning: Pinning | None,
    connections: int = 4,
    log: Any = print,
) -> dict[str, list[Sample]]:
    """One :class:`Sample` per variant and round (alternating order)."""
    # The image is pushed through a registry that takes no token.
    plain = next((v.name for v in variants if not v.token), None)
    if plain is None:
        raise ValueError("the variants need one without a token (none) to push the image")
    ca = TestCA()
    tls, root_file, storage = workdir / "tls.pem", workdir / "ca.pem", workdir / "storage"
    tls.write_bytes(ca.issue([NAME]))
    tls.chmod(0o600)
    root_file.write_bytes(ca.pem)
    now = dt.datetime.now(dt.UTC)
    keyring = Keyring.create(now)
    bundle = workdir / "token-roots.pem"
    bundle.write_bytes(keyring.bundle_pem(now))
    registries: dict[str, _Registry] = {}
    targets: dict[str, Target] = {}
    previous = os.sched_getaffinity(0)
    try:
        if pinning is not None:
            os.sched_setaffinity(0, pinning.server)  # the registries inherit it
        for variant, port in zip(variants, free_ports(len(variants)), strict=True):
            auth = token_auth(variant, bundle) if variant.token else None
            log_settings = {"level": "warn"} if "warn" in variant.changes else None
            registry = _Registry(
                workdir / f"registry-{len(registries)}",
                binary,
                port,
                storage,
                tls,
                auth,
                log_settings,
            )
            registries[variant.name] = registry
            header = f"Bearer {signed_token(variant, keyring, binary, now)}"
            targets[variant.name] = Target(
                port, header if variant.token else None, False, (registry.proc.pid,)
            )
    finally:
        os.sched_setaffinity(0, previous)
    try:
        for registry in registries.values():
            _wait_https(registry.port, ca.pem, registry.proc, registry.log)
        image = workdir / "image"
        make_oci_image(image, tag="v1", size=4096)
        skopeo = Skopeo(workdir / "skopeo", ca.pem, [NAME])
        skopeo.push(image, "v1", f"{NAME}:{targets[plain].port}/{REPOSITORY}:v1")
        client = pinning.client if pinning else None
        samples: dict[str, list[Sample]] = {v.name: [] for v in variants}
        names = [v.name for v in variants]
        for index in range(rounds):
            for name in names if index % 2 == 0 else list(reversed(names)):
                one = sample_target(name, targets[name], root_file, client, seconds, connections)
                samples[name].append(one)
                log(
                    f"  {name}: {one.rate:,.0f} requests/s, {one.server_us:,.0f} us CPU per "
                    f"request (load {os.getloadavg()[0]:.1f})"
                )
        return samples
    finally:
        for registry in registries.values():
            registry.stop()


def table(samples: dict[str, list[Sample]]) -> str:
    """Server CPU per request per variant, and its difference to the first variant."""
    names = list(samples)
    base = statistics.median(s.server_us for s in samples[names[0]])
    lines = [
        "| variant | server CPU us/request (median) | rounds | vs "
        f"{names[0]} | requests/s (median) |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        cpu = statistics.median(s.server_us for s in samples[name])
        each = ", ".join(f"{s.server_us:,.0f}" for s in samples[name])
        rate = statistics.median(s.rate for s in samples[name])
        lines.append(f"| {name} | {cpu:,.0f} | {each} | {cpu - base:+,.0f} | {rate:,.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, default=REGISTRY_BINARY)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    try:
        variants = [Variant.parse(text) for text in args.variants.split(",")]
    except ValueError as exc:
        parser.exit(2, f"--variants: {exc}\n")
    if all(v.token for v in variants):
        parser.exit(2, "--variants: one must be without a token (none): it pushes the image\n")
    pinning = None if args.no_pin else Pinning.split()
    print(pinning.describe() if pinning else "not pinned")
    with tempfile.TemporaryDirectory(prefix="auth-config-") as tmp:
        samples = run(Path(tmp), args.binary, variants, args.seconds, args.rounds, pinning)
    print(table(samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
