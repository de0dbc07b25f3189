"""Message signatures (Ed25519): who may send what, checked on the bytes as they arrived.

The coordinator signs every task and global; each device signs its updates, error replies and
statuses. A signed message's header declares "sig": "ed25519" and a 64-byte signature follows
the body, covering every byte before it (wire.py, docs/PROTOCOL.md section 4.1), so the signed
header binds the run id, round, bundle, device id and seq the message carries. The Link signs on
send and checks on receive with a `Keys`; a failure is refused as "bad signature: ...".

Keys as text: a public key is "ed25519:" + base64 of its 32 raw bytes (the bundle manifest's
`coordinator_key`, the values of an allowlist file); a private key is a PKCS#8 PEM file.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.messages import SECAGG_UP_STAGES, Message, MessageError, SecAgg, encode, kind_of
from edgeftl.device.protocol.topics import DEVICE_ID

ALGORITHM = "ed25519"
COORDINATOR = "@coordinator"  # who signs tasks and globals (never a device id: those start alphanumeric)
KEY_PREFIX = f"{ALGORITHM}:"
MAX_KEY_FILE = 1 << 20


def signer_of(message: Message) -> str:
    """Whose key must have signed `message`: its device's, or the coordinator's (tasks, globals,
    and the secure-aggregation stages the coordinator sends to one device)."""
    if isinstance(message, SecAgg) and message.stage not in SECAGG_UP_STAGES:
        return COORDINATOR
    return getattr(message, "device_id", COORDINATOR)


@dataclass(frozen=True)
class Keys:
    """One side's keys. `signing`: this side's private key (None: send unsigned). `trusted`:
    signer (a device id, or COORDINATOR) -> public key; None accepts unsigned messages, a dict
    refuses any message not signed by its signer's key there."""

    signing: Ed25519PrivateKey | None = None
    trusted: dict[str, Ed25519PublicKey] | None = None

    def sign(self, message: Message, version: int = wire.FORMAT_VERSION) -> bytes:
        """The message's bytes (in message `version`), signed when this side has a signing key."""
        if self.signing is None:
            return encode(message, version=version)
        unsigned = encode(message, ALGORITHM, version)
        return unsigned + self.signing.sign(unsigned)

    def check(self, payload: bytes, message: Message) -> None:
        """Raise MessageError unless `payload` (already decoded as `message`) is signed by its
        signer's trusted key; nothing to check when `trusted` is None."""
        if self.trusted is None:
            return
        signer = signer_of(message)
        key = self.trusted.get(signer)
        if key is None:
            raise MessageError(f"unknown device: {signer!r} is not on the allowlist")
        whose = "the coordinator" if signer == COORDINATOR else f"device {signer!r}"
        parts = wire.signed_parts(payload) if payload[:4] == wire.MAGIC else None
        if parts is None:
            raise MessageError(f"bad signature: unsigned {kind_of(message)} from {whose}")
        algorithm, signed, signature = parts
        if algorithm != ALGORITHM:
            raise MessageError(f"bad signature: algorithm {algorithm!r}, expected {ALGORITHM!r}")
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            raise MessageError(f"bad signature: {kind_of(message)} not signed with the key of {whose}") from None


def verifier(keys: dict[str, Ed25519PublicKey]) -> Callable[[str, bytes, bytes], bool]:
    """(signer, data, signature) -> whether `signature` is `signer`'s over `data`: what secure
    aggregation uses to check that a roster's keys came from the listed devices."""
    def verify(signer: str, data: bytes, signature: bytes) -> bool:
        key = keys.get(signer)
        try:
            return key is not None and key.verify(signature, data) is None
        except InvalidSignature:
            return False
    return verify


def device_keys(signing_key: Path | None, pinned: str | None) -> Keys:
    """A device's keys: its own signing key (a file), and the coordinator's key its bundle pins."""
    trusted = {COORDINATOR: parse_public_key(pinned, "the bundle's coordinator_key")} if pinned else None
    return Keys(load_private_key(signing_key) if signing_key else None, trusted)


def coordinator_keys(signing_key: Path | None, allowlist: Path | None, pinned: str | None) -> Keys:
    """The coordinator's keys; refused when the bundle pins a key that `signing_key` is not."""
    signing = load_private_key(signing_key) if signing_key else None
    if pinned is not None and (signing is None or public_key_text(signing) != pinned):
        raise ValueError(f"the bundle pins coordinator key {pinned}: devices would refuse every task; pass "
                         "--signing-key with its private key" + (", not another one" if signing else ""))
    return Keys(signing, read_allowlist(allowlist) if allowlist else None)


# ---- keys as text and files ---------------------------------------------------------------


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: object, where: str) -> Ed25519PublicKey:
    """A public key from its text form. Raises ValueError naming `where` and the accepted form."""
    accepted = f"{KEY_PREFIX}<base64 of 32 bytes>"
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise ValueError(f"{where} must be a public key {accepted}, got {str(text)[:60]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{where} is not valid base64 of 32 bytes; expected {accepted}")
    return Ed25519PublicKey.from_public_bytes(raw)


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS#8 PEM file (as `edgeftl certs` writes them)."""
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"signing key {str(path)!r} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {str(path)!r} is a {type(key).__name__}; an Ed25519 key is needed")
    return key


def read_allowlist(path: Path) -> dict[str, Ed25519PublicKey]:
    """Device id -> public key from a JSON object {"dev-1": "ed25519:...", ...}."""
    try:
        data = json.loads(_read(path, "allowlist"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"allowlist {str(path)!r} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"allowlist {str(path)!r} must be a non-empty JSON object: device id -> public key")
    keys = {}
    for device, text in data.items():
        if not DEVICE_ID.fullmatch(device):
            raise ValueError(f"allowlist {str(path)!r}: {device[:64]!r} is not a device id")
        keys[device] = parse_public_key(text, f"allowlist {str(path)!r} entry {device!r}")
    return keys


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if path.stat().st_size > MAX_KEY_FILE:
        raise ValueError(f"{what} {str(path)!r} is over {MAX_KEY_FILE} bytes")
    return path.read_bytes()
