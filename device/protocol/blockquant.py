"""Symmetric block quantization and int4 nibble packing: the one layout weights and updates share.

The build stores frozen int8 / int4 weights with it (`quantization/int8.py`, `int4.py`, read by
ONNX Runtime's MatMulNBits in the lower stack), and devices compress their updates with it
(`codecs/dense.py` `int8:B` / `int4:B`, docs/PROTOCOL.md). numpy only: devices import it.

- Values are cut into blocks of consecutive values (a block of a flat vector, or of a row); a
  caller that pads a last short block pads it with zeros.
- One float32 scale per block. The usual scale is `max|block| / LEVELS[bits]` (`block_scales`), so the
  block's largest magnitude becomes code +-L; an all-zero block gets scale 1.0 (its codes are 0,
  and no reader divides by zero). int4 weights may pick a smaller scale per block to clip its
  few largest values (`quantization/int4.py`).
- Codes: `round_half_even(value / scale)` clipped to the signed range of the width,
  `[CODE_MIN[bits], L]` = [-128, 127] or [-8, 7]. A `max / L` scale writes only -L..L
  (symmetric, as the update codecs promise); the lowest code is reached only by a clipped int4
  weight scale (1.7% of MiniLM's int4 weight codes; clipping them to -7 instead raised its int4
  relative weight error from 0.089 to 0.094).
- int8 codes are stored as int8. int4 codes are stored as the unsigned nibble `code + 8`, two
  per byte, the even index in the LOW nibble (bits 0-3), the odd index in the HIGH nibble:
  `byte[j] = (q[2j] + 8) + 16 * (q[2j + 1] + 8)`. This is MatMulNBits' order with its default
  zero point 8.
- Values come back as `code * scale` in float32.
"""

from __future__ import annotations

import numpy as np

LEVELS = {8: 127, 4: 7}  # L: the code a block's largest magnitude gets with a `max / L` scale
CODE_MIN = {8: -128, 4: -8}  # the width's lowest code (see the module docstring)
NIBBLE_OFFSET = 8  # unsigned int4 nibble = signed code + 8


def check_bits(bits: int) -> int:
    """`bits` if it is a supported code width (8 or 4), else ValueError naming it."""
    if bits not in LEVELS:
        raise ValueError(f"block quantization supports {sorted(LEVELS)} bits, got {bits!r}")
    return bits


def padded_size(size: int, block: int) -> int:
    """`size` rounded up to a whole number of blocks of `block` values."""
    return -(-size // block) * block


def block_scales(blocks: np.ndarray, bits: int) -> np.ndarray:
    """`max|block| / L` per block (1.0 for an all-zero block), in the dtype of `blocks`.

    Args:
        blocks: (..., block) values; the last axis is one block.
        bits: code width, 8 or 4.

    Returns:
        (...) scales, computed in the dtype of `blocks` (callers store them as float32).
    """
    scale = np.abs(blocks).max(axis=-1) / LEVELS[check_bits(bits)]
    scale[scale == 0] = 1.0
    return scale


def block_codes(blocks: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Signed int8 codes of `blocks` (..., block) with one `scale` (...) per block.

    Rounds half to even in the dtype of the division (float64 weights, float32 updates), then
    clips to the width's range `[CODE_MIN[bits], LEVELS[bits]]`.
    """
    check_bits(bits)
    q = np.rint(blocks / scale[..., None])
    return np.clip(q, CODE_MIN[bits], LEVELS[bits]).astype(np.int8)


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values `code * scale` of codes (..., block) and scales (...), computed in float32."""
    return codes.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack signed int4 codes two per byte along the last axis, the even index in the low nibble.

    Args:
        codes: integer codes in [-8, 7], shape (..., n) with n even.

    Returns:
        uint8 (..., n // 2) in the layout of this module's docstring.

    Raises:
        ValueError: if the last axis is odd or a code does not fit a nibble.
    """
    codes = np.asarray(codes)
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise ValueError(f"expected int4 codes with an even last axis, got shape {codes.shape}")
    if codes.size and (codes.min() < CODE_MIN[4] or codes.max() > LEVELS[4]):
        raise ValueError(f"int4 codes must lie in [{CODE_MIN[4]}, {LEVELS[4]}]")
    nibbles = (codes.astype(np.int16) + NIBBLE_OFFSET).astype(np.uint8)
    return (nibbles[..., 0::2] + 16 * nibbles[..., 1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_nibbles`: uint8 (..., n) -> signed int8 codes (..., 2 n) in [-8, 7]."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim == 0:
        raise ValueError(f"expected packed uint8 codes, got {packed.dtype} of shape {packed.shape}")
    # Division and remainder, not bit operations: the same arithmetic as the exported graphs,
    # which cannot use BitwiseAnd / BitShift at opset 17 (`quantization/modules.py`).
    nibbles = np.stack([packed % 16, packed // 16], axis=-1).reshape(*packed.shape[:-1], -1)
    return (nibbles.astype(np.int16) - NIBBLE_OFFSET).astype(np.int8)
