"""The few facts the agent needs from an X.509 certificate, read with a small DER reader.

Standard library only: the long-running process must not load ``cryptography``, whose
bindings cost about 8 MB of resident memory for a handful of fields. This reader does not
verify anything (signatures, chains, key matches are OpenSSL's job, through :mod:`ssl`);
it only has to read well-formed certificates exactly as ``cryptography`` does and refuse
malformed ones with a ValueError.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass

# Universal tags (X.690 8.1.2), with the constructed bit where the type always has it.
_BOOLEAN = 0x01
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_SEQUENCE = 0x30
_SET = 0x31
# Context-specific tags in TBSCertificate, GeneralName and AuthorityKeyIdentifier.
_VERSION = 0xA0
_EXTENSIONS = 0xA3
_DNS_NAME = 0x82
_IP_ADDRESS = 0x87  # [7] IMPLICIT OCTET STRING: 4 or 16 bytes
_KEY_IDENTIFIER = 0x80

_SUBJECT_ALT_NAME = "2.5.29.17"
_AUTHORITY_KEY_ID = "2.5.29.35"

# cryptography's short names in Name.rfc4514_string(); others print as a dotted OID.
_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, as everyone actually uses it
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class CertInfo:
    """What the agent reads from one certificate."""

    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str
    names: frozenset[str]
    authority_key_id: bytes | None
    fingerprint: str
    public_key_algorithm: str

    def describe(self) -> str:
        return (
            f"serial {self.serial:x} for {', '.join(sorted(self.names))}, "
            f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC"
        )


def split_pem(data: bytes) -> list[bytes]:
    """The DER of every CERTIFICATE block in ``data``, in order; other blocks are skipped."""
    ders = []
    for match in _PEM_CERTIFICATE.finditer(data):
        body = b"".join(match.group(1).split())
        try:
            ders.append(base64.b64decode(body, validate=True))
        except binascii.Error as error:
            raise ValueError(f"a PEM certificate is not valid base64: {error}") from None
    return ders


def load_pem_chain(data: bytes) -> tuple[CertInfo, ...]:
    """Every certificate of a PEM bundle, in order; ValueError when there is none."""
    ders = split_pem(data)
    if not ders:
        raise ValueError("no PEM certificate found")
    return tuple(parse_der(der) for der in ders)


def parse_der(der: bytes) -> CertInfo:
    """Read a DER certificate; ValueError when it is malformed."""
    try:
        return _parse_certificate(der)
    except (IndexError, UnicodeDecodeError) as error:
        raise ValueError(f"malformed certificate: {error}") from None


def _parse_certificate(der: bytes) -> CertInfo:
    certificate = _Reader(der).only(_SEQUENCE, "Certificate")
    tbs = _Reader(certificate).next(_SEQUENCE, "TBSCertificate")
    fields = _Reader(tbs)
    if fields.peek() == _VERSION:
        fields.next(_VERSION, "version")
    serial = int.from_bytes(fields.next(_INTEGER, "serialNumber"), "big", signed=True)
    fields.next(_SEQUENCE, "signature")
    issuer = _rfc4514(fields.next(_SEQUENCE, "issuer"))
    validity = _Reader(fields.next(_SEQUENCE, "validity"))
    not_before = _time(*validity.any("notBefore"))
    not_after = _time(*validity.any("notAfter"))
    validity.end("validity")
    fields.next(_SEQUENCE, "subject")
    spki = _Reader(fields.next(_SEQUENCE, "subjectPublicKeyInfo"))
    algorithm = _Reader(spki.next(_SEQUENCE, "algorithm"))
    public_key_algorithm = _oid(algorithm.next(_OID, "algorithm"))

    names: frozenset[str] = frozenset()
    authority_key_id = None
    while not fields.at_end():
        tag, value = fields.any("TBSCertificate field")
        if tag != _EXTENSIONS:
            continue  # issuerUniqueID, subjectUniqueID
        for oid, extension in _extensions(value):
            if oid == _SUBJECT_ALT_NAME:
                names = _dns_names(extension)
            elif oid == _AUTHORITY_KEY_ID:
                authority_key_id = _key_identifier(extension)
    return CertInfo(
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        issuer=issuer,
        names=names,
        authority_key_id=authority_key_id,
        fingerprint=hashlib.sha256(der).hexdigest(),
        public_key_algorithm=public_key_algorithm,
    )


class _Reader:
    """Consecutive DER TLVs in ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def peek(self) -> int | None:
        return None if self.at_end() else self.data[self.pos]

    def any(self, what: str) -> tuple[int, bytes]:
        """The next element's tag and contents."""
        if self.at_end():
            raise ValueError(f"malformed certificate: {what} is missing")
        data, pos = self.data, self.pos
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise ValueError(f"malformed certificate: {what} has a multi-byte tag")
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4:
                raise ValueError(f"malformed certificate: {what} has an unsupported length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise ValueError(f"malformed certificate: {what} runs past its end")
        self.pos = pos + length
        return tag, data[pos : pos + length]

    def next(self, tag: int, what: str) -> bytes:
        """The contents of the next element, which must have ``tag``."""
        found, value = self.any(what)
        if found != tag:
            raise ValueError(f"malformed certificate: {what} has tag {found:#x}, not {tag:#x}")
        return value

    def only(self, tag: int, what: str) -> bytes:
        """The contents of the single element that must fill the data."""
        value = self.next(tag, what)
        self.end(what)
        return value

    def end(self, what: str) -> None:
        if not self.at_end():
            raise ValueError(f"malformed certificate: trailing data after {what}")


def _oid(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise ValueError("malformed certificate: truncated object identifier")
    arcs, current = [], 0
    for byte in value:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def _time(tag: int, value: bytes) -> dt.datetime:
    text = value.decode("ascii")
    if tag == _UTC_TIME and re.fullmatch(r"\d{12}Z", text):
        # RFC 5280 4.1.2.5.1: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME or not re.fullmatch(r"\d{14}Z", text):
        raise ValueError(f"malformed certificate: unsupported time {text!r}")
    # Slices rather than strptime, which would load _strptime and its locale tables.
    month, day, hour, minute, second = (int(text[i : i + 2]) for i in range(4, 14, 2))
    try:
        return dt.datetime(int(text[:4]), month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"malformed certificate: bad time {text!r}") from None


def _rfc4514(name: bytes) -> str:
    """The Name as cryptography's ``Name.rfc4514_string()`` prints it."""
    rdns = []
    sequence = _Reader(name)
    while not sequence.at_end():
        attributes = []
        rdn = _Reader(sequence.next(_SET, "RelativeDistinguishedName"))
        while not rdn.at_end():
            pair = _Reader(rdn.next(_SEQUENCE, "AttributeTypeAndValue"))
            oid = _oid(pair.next(_OID, "attribute type"))
            tag, value = pair.any("attribute value")
            key = _ATTRIBUTE_NAMES.get(oid, oid)
            attributes.append(f"{key}={_escape(_attribute_value(tag, value))}")
        rdns.append("+".join(attributes))
    # RFC 4514 2.1: the last RDN comes first.
    return ",".join(reversed(rdns))


def _attribute_value(tag: int, value: bytes) -> str | bytes:
    if tag in _STRING_CODECS:
        return value.decode(_STRING_CODECS[tag])
    if tag == _BIT_STRING:  # x500UniqueIdentifier
        return value[1:]
    return value


def _escape(value: str | bytes) -> str:
    # cryptography's _escape_dn_value, so both spell the same name the same way.
    if not value:
        return ""
    if isinstance(value, bytes):
        return "#" + value.hex()
    for char in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(char, "\\" + char)
    value = value.replace("\0", "\\00")
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def _extensions(value: bytes) -> list[tuple[str, bytes]]:
    found = []
    extensions = _Reader(_Reader(value).only(_SEQUENCE, "extensions"))
    while not extensions.at_end():
        extension = _Reader(extensions.next(_SEQUENCE, "extension"))
        oid = _oid(extension.next(_OID, "extnID"))
        if extension.peek() == _BOOLEAN:
            extension.next(_BOOLEAN, "critical")
        found.append((oid, extension.next(_OCTET_STRING, "extnValue")))
        extension.end("extension")
    return found


def _dns_names(extension: bytes) -> frozenset[str]:
    names = set()
    general_names = _Reader(_Reader(extension).only(_SEQUENCE, "subjectAltName"))
    while not general_names.at_end():
        tag, value = general_names.any("GeneralName")
        if tag == _DNS_NAME:
            names.add(value.decode("ascii").lower())
        elif tag == _IP_ADDRESS and len(value) in (4, 16):
            # As ACME_DOMAINS keeps an IP address: its canonical text form.
            names.add(str(ipaddress.ip_address(value)))
    return frozenset(names)


def _key_identifier(extension: bytes) -> bytes | None:
    fields = _Reader(_Reader(extension).only(_SEQUENCE, "authorityKeyIdentifier"))
    if fields.peek() == _KEY_IDENTIFIER:
        return fields.next(_KEY_IDENTIFIER, "keyIdentifier")
    return None
