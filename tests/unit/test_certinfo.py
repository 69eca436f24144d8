"""certinfo's DER reader against what cryptography reads from the same certificates."""

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from acme_registry import certinfo
from tests.support.vectors import RFC_CERT

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUER = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Hà Nội"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Hoàn Kiếm"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc. <test>+1"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "#ops "),
        x509.NameAttribute(NameOID.COMMON_NAME, "Example Issuing CA R1"),
    ]
)


def make_cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    names: list[str],
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer: x509.Name = ISSUER,
    aki: bool = True,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if names:
        # An email name is not a name the certificate serves: it must be skipped.
        general = [x509.DNSName(n) for n in names] + [x509.RFC822Name("admin@example.com")]
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    if aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(EC_KEY.public_key()),
            critical=False,
        )
    return builder.sign(EC_KEY, hashes.SHA256())


def assert_same(cert: x509.Certificate) -> certinfo.CertInfo:
    der = cert.public_bytes(serialization.Encoding.DER)
    info = certinfo.parse_der(der)
    assert info.serial == cert.serial_number
    assert info.not_before == cert.not_valid_before_utc
    assert info.not_after == cert.not_valid_after_utc
    assert info.not_before.tzinfo is not None and info.not_after.utcoffset() == dt.timedelta(0)
    assert info.issuer == cert.issuer.rfc4514_string()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName)) | {
            str(ip) for ip in san.get_values_for_type(x509.IPAddress)
        }
    except x509.ExtensionNotFound:
        names = frozenset()
    assert info.names == names
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert info.authority_key_id == aki.key_identifier
    except x509.ExtensionNotFound:
        assert info.authority_key_id is None
    assert info.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert info.public_key_algorithm == cert.public_key_algorithm_oid.dotted_string
    return info


@pytest.mark.parametrize("key", [EC_KEY, RSA_KEY], ids=["ec", "rsa"])
def test_fields_match_cryptography(key):
    cert = make_cert(
        key,
        names=["Registry.Example.com", "a.example", "xn--bcher-kva.example", "*.example.org"],
        # The top bit set: DER needs a leading zero byte, and the value is still positive.
        serial=(1 << 151) | 0x1234,
        not_before=dt.datetime(1999, 12, 31, 23, 59, 58, tzinfo=dt.UTC),
        not_after=dt.datetime(2051, 6, 1, 12, 30, 15, tzinfo=dt.UTC),  # GeneralizedTime
    )
    info = assert_same(cert)
    assert info.names == {
        "registry.example.com",
        "a.example",
        "xn--bcher-kva.example",
        "*.example.org",
    }
    assert info.not_after.year == 2051
    assert info.serial > 0


def test_certificate_without_aki_or_san():
    cert = make_cert(
        EC_KEY,
        names=[],
        serial=1,
        not_before=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # UTCTime "49"
        aki=False,
    )
    info = assert_same(cert)
    assert info.authority_key_id is None
    assert info.names == frozenset()


def test_unusual_issuer_names_print_as_cryptography_prints_them():
    issuer = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Multi"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Valued"),
                ]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "example")]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ca@example.com")]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(ObjectIdentifier("1.3.6.1.4.1.99999.1"), 'odd "value";\\')]
            ),
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.COMMON_NAME, " leading and trailing ")]
            ),
        ]
    )
    cert = make_cert(
        RSA_KEY,
        names=["a.example"],
        serial=2**64 - 1,
        not_before=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        issuer=issuer,
    )
    assert_same(cert)


def test_the_rfc_9773_example():
    cert = x509.load_pem_x509_certificate(RFC_CERT)
    info = assert_same(cert)
    assert info.not_before == dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    assert info.issuer == "CN=Example CA"
    assert info.authority_key_id == bytes.fromhex("69885b6b87464041e1b37b847ba0ae2cde01c8d4")
    assert info.serial == 0x87654321


def test_pem_bundle_is_split_in_order_and_other_blocks_skipped():
    certs = [
        make_cert(
            EC_KEY,
            names=[f"n{i}.example"],
            serial=i + 1,
            not_before=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
            not_after=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        )
        for i in range(3)
    ]
    key_pem = EC_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    bundle = b"leading text\n" + pems[0] + key_pem + pems[1] + b"\r\n" + pems[2]
    assert certinfo.split_pem(bundle) == [c.public_bytes(serialization.Encoding.DER) for c in certs]
    assert [i.serial for i in certinfo.load_pem_chain(bundle)] == [1, 2, 3]
    assert certinfo.split_pem(key_pem) == []


def test_pem_with_crlf_line_ends():
    pem = x509.load_pem_x509_certificate(RFC_CERT).public_bytes(serialization.Encoding.PEM)
    assert certinfo.load_pem_chain(pem.replace(b"\n", b"\r\n"))[0].serial == 0x87654321


def rfc_der() -> bytes:
    return x509.load_pem_x509_certificate(RFC_CERT).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"", "missing"),
        (rfc_der()[:-1], "runs past its end"),
        (rfc_der()[:40], "runs past its end"),
        (rfc_der() + b"\x00", "trailing data"),
        (b"\x04\x03abc", "tag 0x4"),
        (b"\x30\x80\x00\x00", "unsupported length"),
        (b"\x30\x00", "TBSCertificate is missing"),
    ],
)
def test_malformed_der_is_a_value_error(der, message):
    with pytest.raises(ValueError, match=message):
        certinfo.parse_der(der)


def test_every_truncation_is_a_value_error():
    der = rfc_der()
    for end in range(len(der)):
        with pytest.raises(ValueError):
            certinfo.parse_der(der[:end])


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_a_bundle_without_certificates_is_a_value_error(pem):
    with pytest.raises(ValueError, match="no PEM certificate"):
        certinfo.load_pem_chain(pem)


def test_bad_base64_is_a_value_error():
    pem = b"-----BEGIN CERTIFICATE-----\nMII*not base64*\n-----END CERTIFICATE-----\n"
    with pytest.raises(ValueError, match="base64"):
        certinfo.load_pem_chain(pem)


def test_describe():
    cert = make_cert(
        EC_KEY,
        names=["b.example", "a.example"],
        serial=0xABC,
        not_before=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2026, 2, 3, 4, 5, tzinfo=dt.UTC),
    )
    info = certinfo.parse_der(cert.public_bytes(serialization.Encoding.DER))
    assert info.describe() == (
        "serial abc for a.example, b.example, valid until 2026-02-03 04:05 UTC"
    )


def test_ip_address_names_are_read_in_canonical_form():
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ISSUER)
        .public_key(EC_KEY.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2026, 1, 8, tzinfo=dt.UTC))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("2001:db8:0:0::7")),
                ]
            ),
            critical=False,
        )
    )
    cert = builder.sign(EC_KEY, hashes.SHA256())
    info = certinfo.parse_der(cert.public_bytes(serialization.Encoding.DER))
    assert info.names == frozenset({"127.0.0.1", "2001:db8::7"})
