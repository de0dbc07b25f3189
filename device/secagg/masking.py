"""The masks: y_u = v_u + PRG(b_u) + sum over v != u of sign(u, v) * PRG(s_uv)   (mod 2^32).

sign(u, v) = +1 when u's device id sorts before v's (byte order of the UTF-8 ids), else -1, so the
pairwise masks of u and v cancel in the sum. s_uv = HKDF(X25519(s_sk_u, s_pk_v)) = s_vu.
All arithmetic is uint32 with wrap-around (numpy's unsigned addition and subtraction).
"""

from __future__ import annotations

import numpy as np

from edgeftl.device.secagg import crypto
from edgeftl.device.secagg.prg import prg_uint32


def sign(u: str, v: str) -> int:
    return 1 if u.encode() < v.encode() else -1


def pair_mask(own: str, s_sk: bytes, other: str, s_pk: bytes, ctx: bytes, count: int) -> np.ndarray:
    """sign(own, other) * PRG(s_{own,other}) as uint32: what `own` added for the pair."""
    mask = prg_uint32(crypto.agree(s_sk, s_pk, crypto.MASK_SEED_LABEL, ctx), count)
    return mask if sign(own, other) > 0 else np.negative(mask)  # -x mod 2^32


def mask(vector: np.ndarray, own: str, b: bytes, s_sk: bytes, others: dict[str, bytes], ctx: bytes) -> np.ndarray:
    """y = vector + PRG(b) + the pairwise masks with every device in `others` (id -> s_pk)."""
    y = vector.astype(np.uint32, copy=True)
    y += prg_uint32(b, y.size)
    for other, s_pk in others.items():
        y += pair_mask(own, s_sk, other, s_pk, ctx, y.size)
    return y
