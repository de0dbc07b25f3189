"""Write docs/conformance/secagg_vectors.json: secure-aggregation test vectors for other implementations.

Fixed keys, seeds, coefficients and nonces go through the reference code (device/secagg), so
each vector is what docs/SECAGG.md defines: the PRG, both key derivations, share sealing,
Shamir shares, the fixed-point encoding, and one whole round of three devices (masked vectors,
their sum, the decoded mean). tests/test_secagg.py checks that the file is current.

    python tools/make_secagg_vectors.py          # rewrite the file
    python tools/make_secagg_vectors.py --check  # exit 1 if it differs from what the code makes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeftl.device.secagg import crypto, masking, shamir
from edgeftl.device.secagg.fixedpoint import FixedPoint
from edgeftl.device.secagg.prg import prg_uint32

OUT = Path(__file__).resolve().parent.parent / "docs" / "conformance" / "secagg_vectors.json"
CTX_FIELDS = {"run_id": "run-1", "round": 3, "bundle_sha256": "ab" * 32}


def fixed_bytes(label: str) -> bytes:
    """32 bytes that stand in for randomness: SHA-256 of a label."""
    return hashlib.sha256(label.encode()).digest()


def vectors() -> dict:
    ctx = crypto.context(*CTX_FIELDS.values())
    u_sk, v_sk = fixed_bytes("u"), fixed_bytes("v")
    v_pk = crypto.public_of(v_sk)
    share_key = crypto.agree(u_sk, v_pk, crypto.SHARE_KEY_LABEL, ctx)
    nonce, plaintext = fixed_bytes("nonce")[:crypto.NONCE_BYTES], bytes(range(2 * shamir.SHARE_BYTES))
    aad = crypto.pair_aad(ctx, "u", "v")
    secret, coefficients = fixed_bytes("secret"), [int.from_bytes(fixed_bytes(f"a{i}"), "big") % shamir.PRIME
                                                   for i in (1, 2)]
    poly = [int.from_bytes(secret, "big"), *coefficients]
    fixed = FixedPoint(clip=1.0, weight_cap=16, max_devices=3)
    return {
        "about": "edgeftl secure aggregation (docs/SECAGG.md) test vectors, made by tools/make_secagg_vectors.py "
                 "from the reference code; byte strings are lowercase hex, uint32 values decimal.",
        "context": {**CTX_FIELDS, "ctx": ctx.decode()},
        "prg": {"seed": fixed_bytes("seed").hex(), "count": 8,
                "values": prg_uint32(fixed_bytes("seed"), 8).tolist()},
        "kdf": {"sk_u": u_sk.hex(), "pk_u": crypto.public_of(u_sk).hex(), "sk_v": v_sk.hex(), "pk_v": v_pk.hex(),
                "share_key": share_key.hex(),
                "mask_seed": crypto.agree(u_sk, v_pk, crypto.MASK_SEED_LABEL, ctx).hex()},
        "seal": {"key": share_key.hex(), "nonce": nonce.hex(), "plaintext": plaintext.hex(), "aad": aad.hex(),
                 "sealed": (nonce + AESGCM(share_key).encrypt(nonce, plaintext, aad)).hex()},
        "shamir": {"prime": str(shamir.PRIME), "secret": secret.hex(), "threshold": 3,
                   "coefficients": [str(c) for c in coefficients],
                   "shares": {str(x): shamir.share_bytes(shamir.evaluate(poly, x)).hex() for x in range(1, 6)}},
        "fixed_point": _fixed_point(fixed),
        "round": _round(ctx, fixed),
    }


def _fixed_point(fixed: FixedPoint) -> dict:
    x = np.array([0.5, -0.25, 3.0, -1e-6], np.float32)
    return {"clip": fixed.clip, "weight_cap": fixed.weight_cap, "max_devices": fixed.max_devices,
            "scale": fixed.scale, "update": x.tolist(), "weight": 5, "encoded": fixed.encode(x, 5).tolist()}


def _round(ctx: bytes, fixed: FixedPoint) -> dict:
    """Three devices a, b, c (all survive): each one's keys, seed, input and masked vector; the sum and mean."""
    ids, updates = ["a", "b", "c"], {"a": [0.1, -0.2, 0.3], "b": [0.0, 0.4, -0.5], "c": [1.5, 0.25, -0.125]}
    weights = {"a": 1, "b": 2, "c": 16}
    s_sk = {d: fixed_bytes(f"s_sk {d}") for d in ids}
    b = {d: fixed_bytes(f"b {d}") for d in ids}
    s_pk = {d: crypto.public_of(s_sk[d]) for d in ids}
    devices, total = {}, np.zeros(4, np.uint32)
    for d in ids:
        encoded = fixed.encode(np.array(updates[d], np.float32), weights[d])
        masked = masking.mask(encoded, d, b[d], s_sk[d], {o: s_pk[o] for o in ids if o != d}, ctx)
        total += masked
        devices[d] = {"s_sk": s_sk[d].hex(), "s_pk": s_pk[d].hex(), "b": b[d].hex(), "update": updates[d],
                      "weight": weights[d], "encoded": encoded.tolist(), "masked": masked.tolist()}
    for d in ids:
        total -= prg_uint32(b[d], total.size)
    mean, weight = fixed.decode(total, len(ids))
    return {"fixed_point": {"clip": fixed.clip, "weight_cap": fixed.weight_cap, "max_devices": fixed.max_devices},
            "devices": devices, "sum_unmasked": total.tolist(), "total_weight": weight, "mean": mean.tolist()}


def render() -> str:
    return json.dumps(vectors(), indent=1, sort_keys=True) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the committed file is not current")
    args = p.parse_args()
    text = render()
    if args.check:
        current = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'current' if current else 'out of date'}")
        return 0 if current else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
