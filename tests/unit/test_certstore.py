"""Pairs judged without cryptography: key match and chain checks done by OpenSSL via ssl."""

import datetime as dt
import os
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from acme_registry import certstore
from acme_registry.certstore import CertStore, client_hostname, parse_pair, unusable_reason

NAMES = ("registry.test", "other.test")
NOW = dt.datetime.now(dt.UTC)
DIRECTORY = "https://ca.test/directory"


def key_pem(key: object, encryption: object = None) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        key: object,
        names: tuple[str, ...] = NAMES,
        not_before: dt.datetime = NOW - dt.timedelta(hours=1),
        not_after: dt.datetime = NOW + dt.timedelta(days=30),
    ) -> bytes:
        """The chain PEM, leaf first."""
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.name)
            .public_key(key.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert_pem(leaf) + cert_pem(self.cert)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("certstore test CA")


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def trusting(ca: CA) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=cert_pem(ca.cert).decode())


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_a_matching_pair_is_read(ca, kind):
    key = (
        ec.generate_private_key(ec.SECP384R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    chain = ca.issue(key)
    pair = parse_pair(chain, key_pem(key))
    leaf = x509.load_pem_x509_certificate(chain)
    assert pair.serial == leaf.serial_number
    assert pair.names == frozenset(NAMES)
    assert pair.fingerprint == leaf.fingerprint(hashes.SHA256()).hex()
    assert pair.issuer == "CN=certstore test CA"
    assert pair.not_after == leaf.not_valid_after_utc
    assert len(pair.chain) == 2
    assert pair.describe().startswith(f"serial {leaf.serial_number:x} for other.test, registry")


def test_the_combined_file_reads_as_both_halves(ca, key):
    # tls.pem holds chain and key; a test reads it as both.
    combined = ca.issue(key) + key_pem(key)
    assert parse_pair(combined, combined).names == frozenset(NAMES)


def test_a_key_that_does_not_match_is_refused(ca, key):
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match=r"^the private key does not match the certificate$"):
        parse_pair(ca.issue(key), key_pem(other))


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda k: b"", "no PEM private key"),
        (lambda k: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "OpenSSL"),
        (lambda k: key_pem(k, serialization.BestAvailableEncryption(b"pw")), "encrypted"),
        (
            lambda k: k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "encrypted",
        ),
    ],
)
def test_unreadable_keys_are_refused(ca, key, make_key, message):
    with pytest.raises(ValueError, match=f"private key.*{message}"):
        parse_pair(ca.issue(key), make_key(key))


def test_unreadable_certificates_are_refused(key):
    with pytest.raises(ValueError, match="certificate unreadable"):
        parse_pair(b"junk", key_pem(key))


def test_only_ec_and_rsa_keys_are_accepted(ca):
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="only EC and RSA"):
        parse_pair(ca.issue(key), key_pem(key))


def test_the_check_works_without_memfd(ca, key, monkeypatch):
    monkeypatch.delattr(os, "memfd_create")
    assert parse_pair(ca.issue(key), key_pem(key)).names == frozenset(NAMES)
    with pytest.raises(ValueError, match="does not match"):
        parse_pair(ca.issue(key), key_pem(ec.generate_private_key(ec.SECP256R1())))


def test_our_own_pair_is_judged_by_names_dates_and_directory(ca, key):
    pair = parse_pair(ca.issue(key), key_pem(key))
    assert unusable_reason(pair, NAMES, NOW, DIRECTORY, DIRECTORY) is None
    assert "names other.test, registry.test, not registry.test" in unusable_reason(
        pair, NAMES[:1], NOW, DIRECTORY, DIRECTORY
    )
    assert "expired" in unusable_reason(pair, NAMES, NOW + dt.timedelta(days=31), DIRECTORY, "x")
    assert "not valid yet" in unusable_reason(pair, NAMES, NOW - dt.timedelta(days=1), None, "x")
    assert "issued through" in unusable_reason(pair, NAMES, NOW, DIRECTORY, "https://other/")


def test_a_foreign_pair_must_chain_to_a_trusted_root(ca, key):
    pair = parse_pair(ca.issue(key), key_pem(key))
    assert unusable_reason(pair, NAMES, NOW, None, DIRECTORY, trusting(ca)) is None
    reason = unusable_reason(pair, NAMES, NOW, None, DIRECTORY, trusting(CA("another CA")))
    # The chain carries the root, so OpenSSL names it rather than a missing issuer.
    assert (
        reason
        == "it does not chain to a trusted root (self-signed certificate in certificate chain)"
    )


def test_a_foreign_pair_without_its_intermediate_is_refused(key):
    root, intermediate_key = CA("root"), ec.generate_private_key(ec.SECP256R1())
    intermediate = CA("intermediate")
    intermediate.key = intermediate_key
    intermediate.cert = (
        x509.CertificateBuilder()
        .subject_name(intermediate.name)
        .issuer_name(root.name)
        .public_key(intermediate_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    full = intermediate.issue(key)
    pair = parse_pair(full, key_pem(key))
    assert unusable_reason(pair, NAMES, NOW, None, DIRECTORY, trusting(root)) is None
    leaf_only = parse_pair(full[: full.index(b"-----END CERTIFICATE-----") + 26], key_pem(key))
    assert len(leaf_only.chain) == 1
    assert unusable_reason(leaf_only, NAMES, NOW, None, DIRECTORY, trusting(root)) == (
        "it does not chain to a trusted root (unable to get local issuer certificate)"
    )


def test_a_foreign_pair_is_checked_against_ssl_cert_file(ca, key, tmp_path):
    chain = ca.issue(key)
    (tmp_path / "roots.pem").write_bytes(cert_pem(ca.cert))
    script = textwrap.dedent(
        f"""
        import datetime as dt, sys
        from acme_registry.certstore import parse_pair, unusable_reason
        pair = parse_pair({chain!r}, {key_pem(key)!r})
        print(unusable_reason(pair, {NAMES!r}, dt.datetime.now(dt.UTC), None, "x"))
        """
    )

    def run(cert_file: str) -> str:
        env = {**os.environ, "SSL_CERT_FILE": cert_file, "SSL_CERT_DIR": str(tmp_path / "none")}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    assert run(str(tmp_path / "roots.pem")) == "None"
    assert "does not chain" in run(str(tmp_path / "missing.pem"))


def test_the_store_saves_and_loads_the_pair(ca, key, tmp_path):
    store = CertStore(tmp_path / "certs")
    (tmp_path / "certs").mkdir()
    assert store.load() is None
    pair = parse_pair(ca.issue(key), key_pem(key))
    store.save(pair)
    loaded = store.load()
    assert loaded == pair
    # A key replaced by hand behind the agent's back is noticed on the next load.
    (tmp_path / "certs" / "live" / "domain.key").write_bytes(
        key_pem(ec.generate_private_key(ec.SECP256R1()))
    )
    with pytest.raises(ValueError, match="does not match"):
        store.load()
    assert store.load_quietly() is None


def test_the_long_running_side_never_loads_cryptography(ca, key, tmp_path):
    """The agent's whole certificate path, in a process that must end without cryptography."""
    store = tmp_path / "certs"
    CertStore(store).save(parse_pair(ca.issue(key), key_pem(key)))
    script = textwrap.dedent(
        f"""
        import datetime as dt, sys
        from pathlib import Path
        import acme_registry.launcher, acme_registry.agent
        from acme_registry import ari
        from acme_registry.certstore import CertStore, unusable_reason
        pair = CertStore(Path({str(store)!r})).load()
        ari.cert_id(pair.leaf)
        unusable_reason(pair, {NAMES!r}, dt.datetime.now(dt.UTC), None, "x")
        print(sorted(m for m in sys.modules if m.split(".")[0] in
                     ("cryptography", "acme", "josepy", "requests", "OpenSSL")))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("memfd", [True, False])
def test_pem_files_read_back_and_leave_nothing_open(memfd, monkeypatch):
    if not memfd:
        monkeypatch.delattr(os, "memfd_create")
    before = sorted(os.listdir("/proc/self/fd"))
    with certstore._pem_files(b"a", b"b") as paths:
        assert [Path(p).read_bytes() for p in paths] == [b"a", b"b"]
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert memfd or not any(os.path.exists(p) for p in paths)


def test_client_hostname_is_never_a_wildcard():
    assert client_hostname(["*.example.com", "example.com"]) == "example.com"
    assert client_hostname(["*.example.com"]) == "registry.example.com"
    assert client_hostname(["127.0.0.1"]) == "127.0.0.1"
