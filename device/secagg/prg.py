"""The masks' pseudorandom generator: ChaCha20 keystream read as little-endian uint32.

PRG(seed, m) = the first 4*m bytes of the ChaCha20 keystream (RFC 8439 block function) with
key = seed (32 bytes), block counter 0 and nonce = 12 zero bytes, read as m little-endian
uint32 values. A seed is used for one vector only (seeds are derived from per-round keys), so
the fixed nonce never repeats a (key, nonce) pair across different data.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from edgeftl.device.secagg.errors import SecAggError

SEED_BYTES = 32
# cryptography's ChaCha20 takes a 16-byte "nonce": the 32-bit little-endian block counter, then
# the 96-bit RFC 8439 nonce. Both zero.
_COUNTER_AND_NONCE = bytes(16)


def prg_uint32(seed: bytes, count: int) -> np.ndarray:
    """`count` pseudorandom uint32 values from a 32-byte seed (1-D, dtype uint32).

    Raises:
        SecAggError: a seed that is not 32 bytes or a negative count.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"bad seed: {len(seed)} bytes, expected {SEED_BYTES}")
    if count < 0:
        raise SecAggError(f"bad mask length: {count}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _COUNTER_AND_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * count))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)
