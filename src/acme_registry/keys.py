"""Private keys by type and CSRs, for the issuing child only (they need cryptography)."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {"ec256": ec.SECP256R1(), "ec384": ec.SECP384R1()}
_RSA_BITS = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096}


def generate_key(key_type: str) -> PrivateKey:
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type])
    if key_type in _RSA_BITS:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])
    raise ValueError(f"unknown key type {key_type!r}")


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("only EC and RSA keys are supported")
    return key


def make_csr(key: PrivateKey, domains: tuple[str, ...]) -> bytes:
    """A PEM CSR naming every domain (or IP address) as a SAN (no CN: CAs ignore it)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([_general_name(d) for d in domains]), critical=False
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
