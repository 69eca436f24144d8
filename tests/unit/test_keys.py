import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_csr

from acme_registry import keys
from acme_registry.config import KEY_TYPES


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_generated_key_has_its_type_and_round_trips(key_type):
    key = keys.generate_key(key_type)
    size = key.curve.key_size if key_type.startswith("ec") else key.key_size
    assert str(size) == key_type.removeprefix("ec").removeprefix("rsa")
    loaded = keys.load_key(keys.key_to_pem(key))
    assert loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_csr_names_every_domain_as_san():
    key = keys.generate_key("ec256")
    csr = load_pem_x509_csr(keys.make_csr(key, ("a.example", "b.example")))
    assert csr.is_signature_valid
    from cryptography import x509

    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
