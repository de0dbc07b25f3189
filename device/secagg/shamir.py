"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

A share is (x, y): x the recipient's 1-based place in the round's roster, y = f(x) for a random
polynomial f of degree t - 1 with f(0) = the secret read as a big-endian integer. Any t shares
give f(0) by Lagrange interpolation; t - 1 shares are consistent with every secret.
Pure Python integers, so any language with big integers can check it (docs/SECAGG.md section 4).
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Sequence

from edgeftl.device.secagg.errors import SecAggError

PRIME = 2**256 + 297  # the smallest prime above 2^256: every 32-byte secret is a field element
SECRET_BYTES = 32
SHARE_BYTES = 33  # y as big-endian bytes; PRIME < 2^264


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of `secret` for the points `xs` (distinct, 1..p-1); any `threshold` of them recover it.

    Raises:
        SecAggError: a secret that is not 32 bytes, a threshold outside 1..len(xs), bad points.
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"bad secret: {len(secret)} bytes, expected {SECRET_BYTES}")
    _check_points(xs)
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"bad threshold: {threshold}, expected 1..{len(xs)} (the number of shares)")
    coefficients = [int.from_bytes(secret, "big")] + [_random.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: evaluate(coefficients, x) for x in xs}


def reconstruct(shares: dict[int, int], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (the first `threshold` by x are used).

    Raises:
        SecAggError: fewer than `threshold` shares, a point or value outside the field, or a result
            that is not a 32-byte secret (shares of different secrets, or tampered).
    """
    if len(shares) < threshold:
        raise SecAggError(f"too few shares: {len(shares)}, the threshold is {threshold}")
    _check_points(list(shares))
    if any(not 0 <= y < PRIME for y in shares.values()):
        raise SecAggError("bad share: a value outside the field 0..2^256+296")
    chosen = sorted(shares)[:threshold]
    value = interpolate_at_zero({x: shares[x] for x in chosen})
    if value >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("bad shares: they interpolate to no 32-byte secret (tampered or mixed)")
    return value.to_bytes(SECRET_BYTES, "big")


def interpolate_at_zero(points: dict[int, int]) -> int:
    """f(0) of the polynomial of degree len(points) - 1 through `points`, mod PRIME."""
    total = 0
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def share_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_value(data: bytes) -> int:
    """A share's y from its 33 bytes. Raises SecAggError for another length or a value >= PRIME."""
    if len(data) != SHARE_BYTES:
        raise SecAggError(f"bad share: {len(data)} bytes, expected {SHARE_BYTES}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise SecAggError("bad share: a value outside the field 0..2^256+296")
    return y


def evaluate(coefficients: list[int], x: int) -> int:
    """f(x) mod PRIME for f(x) = coefficients[0] + coefficients[1] x + ..."""
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % PRIME
    return y


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs) or any(type(x) is not int or not 1 <= x < PRIME for x in xs):
        raise SecAggError(f"bad share points: {list(xs)[:8]!r} must be distinct integers >= 1")
