"""Key agreement, key derivation and share encryption of secure aggregation.

Each device holds two X25519 key pairs per round: c (to encrypt the shares it sends through the
coordinator) and s (the pairwise mask seeds). Every derived key is bound to the round's context
(run id, round, bundle hash), so keys and ciphertexts of one round are useless in another.

    key(u, v)  = HKDF-SHA256(X25519(sk_u, pk_v), length 32, salt none, info = LABEL | context)
    seal       = nonce (12 random bytes) | AES-256-GCM(key, nonce, plaintext, aad) (ciphertext | tag)
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edgeftl.device.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_KEY_LABEL = b"edgeftl-secagg share key|"
MASK_SEED_LABEL = b"edgeftl-secagg mask seed|"


def context(run_id: str, round_index: int, bundle_sha256: str) -> bytes:
    """The bytes every derived key and ciphertext of one round is bound to."""
    return f"edgeftl-secagg/1|{run_id}|{round_index}|{bundle_sha256}".encode()


def new_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_of(private: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a raw private key."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, public: bytes, label: bytes, ctx: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret: the same 32 bytes on both ends of a pair.

    Raises:
        SecAggError: a public key that is not 32 bytes or gives the all-zero shared secret.
    """
    if len(public) != KEY_BYTES:
        raise SecAggError(f"bad public key: {len(public)} bytes, expected {KEY_BYTES}")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point gives the all-zero secret
        raise SecAggError(f"bad public key: {exc}") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=label + ctx).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Raises SecAggError when the ciphertext is short, tampered, or sealed for another pair or round."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"bad ciphertext: {len(sealed)} bytes, shorter than nonce and tag")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("bad ciphertext: authentication failed (tampered, or not for this pair and round)") from None


def pair_aad(ctx: bytes, sender: str, recipient: str) -> bytes:
    return ctx + b"|" + sender.encode() + b"|" + recipient.encode()
