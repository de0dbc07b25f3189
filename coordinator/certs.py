"""Everything a secured federation needs, made in one folder (`edgeftl certs`, host side).

    DIR/ca.crt, ca.key                 a private CA (EC P-256)
    DIR/broker.crt, broker.key         the broker's certificate: SAN localhost, 127.0.0.1, ::1, --host
    DIR/passwords                      Mosquitto password file (PBKDF2-SHA512, "$7$" format)
    DIR/allowlist.json                 device id -> Ed25519 public key (`edgeftl coordinator --allowlist`)
    DIR/coordinator/, DIR/devices/ID/  one folder per party, to copy onto it: ca.crt, client.crt and
                                       client.key (mTLS), signing.pem + signing.pub (Ed25519),
                                       password (MQTT; the username is the folder's name)

Private keys and passwords are 0600 and every file is written atomically; an existing folder is
only replaced with force=True.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import secrets
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.auth import private_key_pem, public_key_text
from edgeftl.device.protocol.topics import validate_device_id

COORDINATOR_USER = "coordinator"  # the coordinator's MQTT username and folder name
CA_DAYS, LEAF_DAYS = 3650, 825
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the passwords are random 192-bit tokens
SECRET, PUBLIC = 0o600, 0o644


def make_certs(out: Path, devices: list[str], hosts: list[str], force: bool = False) -> dict[str, object]:
    """Write the folder described above; returns a summary (paths, no secrets).

    Raises:
        ValueError: bad device ids, a device named like the coordinator, or an existing folder
            without `force`.
    """
    devices = [validate_device_id(d) for d in devices]
    if not devices or len(set(devices)) != len(devices) or COORDINATOR_USER in devices:
        raise ValueError(f"--devices must list distinct device ids, none named {COORDINATOR_USER!r}; got {devices}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{str(out)!r} is not empty; pass --force to replace what is there")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca()
    _write_pair(out, "ca", ca_key, ca_cert)
    broker_key = ec.generate_private_key(ec.SECP256R1())
    _write_pair(out, "broker", broker_key, _leaf(ca_key, ca_cert, broker_key, "edgeftl broker", hosts, server=True))
    password_lines, allowlist = [], {}
    for party in [COORDINATOR_USER, *devices]:
        folder = out / (party if party == COORDINATOR_USER else f"devices/{party}")
        password, signing = _party(folder, party, ca_key, ca_cert)
        password_lines.append(f"{party}:{mosquitto_hash(password)}\n")
        allowlist[party] = public_key_text(signing)
    coordinator_key = allowlist.pop(COORDINATOR_USER)
    atomic_write(out / "passwords", "".join(password_lines), mode=SECRET)
    atomic_write(out / "allowlist.json", json.dumps(allowlist, indent=2, sort_keys=True) + "\n", mode=PUBLIC)
    return {"out": str(out), "devices": devices, "hosts": ["localhost", "127.0.0.1", "::1", *hosts],
            "coordinator_key": coordinator_key}


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: $7$iterations$base64(salt)$base64(PBKDF2-HMAC-SHA512)."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# ---- pieces -----------------------------------------------------------------------------------


def _party(folder: Path, name: str, ca_key: ec.EllipticCurvePrivateKey,
           ca_cert: x509.Certificate) -> tuple[str, Ed25519PrivateKey]:
    """A device's or the coordinator's folder; returns its MQTT password and signing key."""
    folder.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_pair(folder, "client", key, _leaf(ca_key, ca_cert, key, name, [], server=False))
    atomic_write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)
    signing = Ed25519PrivateKey.generate()
    atomic_write(folder / "signing.pem", private_key_pem(signing), mode=SECRET)
    atomic_write(folder / "signing.pub", public_key_text(signing) + "\n", mode=PUBLIC)
    password = secrets.token_urlsafe(24)
    atomic_write(folder / "password", password + "\n", mode=SECRET)
    return password, signing


def _write_pair(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(folder / f"{stem}.key", pem, mode=SECRET)
    atomic_write(folder / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeftl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("edgeftl federation CA")
    cert = (_builder(name, name, key, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
          common: str, hosts: list[str], server: bool) -> x509.Certificate:
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(_name(common), ca_cert.subject, key, LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789-.*" for c in host.lower()):
                raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return list(dict.fromkeys(names))
