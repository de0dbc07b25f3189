"""Symmetric block-wise int4 weight quantization with two codes per byte (numpy only).

Layout, relied on by `modules.py`, `ort_int.py` (ONNX Runtime's MatMulNBits uses the same
nibble order) and any device-side reader:

- Each row (output channel of a linear weight, or token vector of an embedding table) is cut
  into blocks of `block_size` consecutive columns. If `cols` is not a multiple of
  `block_size`, the row is padded on the right with zeros up to `padded_cols`; the padding is
  stored (as code 0) and dropped again by `dequantize_int4(..., cols)`, so callers must keep
  the original `cols`. (MiniLM's 384 and 1536 divide by 32 and 128: no padding there.)
- `scale`: float32, shape (rows, padded_cols // block_size); scale = max|block| / 7
  (1.0 for an all-zero block).
- Codes q = round_half_even(w / scale), clipped to [-8, 7] (only -7..7 occur with this
  scale), stored as the unsigned nibble q + 8 in 0..15.
- `packed`: uint8, shape (rows, padded_cols // 2). Byte j of a row holds column 2j in its
  LOW nibble (bits 0-3) and column 2j+1 in its HIGH nibble (bits 4-7):
  `packed[r, j] = (q[r, 2j] + 8) + 16 * (q[r, 2j + 1] + 8)`.
"""

from __future__ import annotations

import numpy as np

from .int8 import _check_matrix

QMAX_INT4 = 7
QMIN_INT4 = -8
NIBBLE_OFFSET = 8  # unsigned nibble = signed code + 8


def padded_cols(cols: int, block_size: int) -> int:
    """Columns after right-padding `cols` up to a whole number of blocks."""
    return -(-cols // block_size) * block_size


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack signed int4 codes (rows, even cols) into uint8 (rows, cols // 2), low nibble first.

    Args:
        codes: Integer codes in [-8, 7], shape (rows, cols) with cols even.

    Returns:
        uint8 array (rows, cols // 2) in the layout of this module's docstring.

    Raises:
        ValueError: If cols is odd or a code is outside [-8, 7].
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 2:
        raise ValueError(f"expected codes of shape (rows, even cols), got {codes.shape}")
    if codes.size and (codes.min() < QMIN_INT4 or codes.max() > QMAX_INT4):
        raise ValueError(f"int4 codes must lie in [{QMIN_INT4}, {QMAX_INT4}]")
    nibbles = (codes.astype(np.int16) + NIBBLE_OFFSET).astype(np.uint8)
    return (nibbles[:, 0::2] + 16 * nibbles[:, 1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_nibbles`: uint8 (rows, n) -> signed int8 codes (rows, 2 n)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"expected packed uint8 of shape (rows, bytes), got {packed.dtype} {packed.shape}")
    # Integer division and remainder, not bit operations: the same arithmetic as the graph,
    # which cannot use BitwiseAnd / BitShift at opset 17.
    low = packed % 16
    high = packed // 16
    nibbles = np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)
    return (nibbles.astype(np.int16) - NIBBLE_OFFSET).astype(np.int8)


def quantize_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D weight to packed int4 with one symmetric scale per block of a row.

    Args:
        w: Floating-point weight, shape (rows, cols).
        block_size: Columns sharing one scale; even and positive (schemes enforce a power
            of two >= 8).

    Returns:
        `(packed, scale)`: packed uint8 (rows, padded_cols // 2); scale float32
        (rows, padded_cols // block_size). Keep `cols` to dequantize.

    Raises:
        ValueError: If `w` is not a finite, non-empty 2-D float array or `block_size` is not even
            and positive.
    """
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be even and positive, got {block_size!r}")
    w64 = _check_matrix(w)
    rows, cols = w64.shape
    padded = np.zeros((rows, padded_cols(cols, block_size)), dtype=np.float64)
    padded[:, :cols] = w64
    blocks = padded.reshape(rows, -1, block_size)  # (rows, n_blocks, block_size)
    scale = _search_scales(blocks)
    codes = np.rint(blocks / scale.astype(np.float64)[:, :, None])
    codes = np.clip(codes, QMIN_INT4, QMAX_INT4).reshape(rows, -1)
    return pack_nibbles(codes), scale


# Clipping ratios tried per block: scale = ratio * max|w| / 7. With only 16 levels, clipping a
# block's few largest values buys finer steps for all the others; the ratio with the lowest
# squared error wins, per block (the grid search of llama.cpp / AWQ-style clipping, without
# activation statistics). Ratio 1.0 (no clipping) is always a candidate, so it never does worse.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _search_scales(blocks: np.ndarray) -> np.ndarray:
    """Per-block scale minimising the squared quantization error; blocks (rows, n_blocks, size)."""
    amax = np.abs(blocks).max(axis=2)
    best_scale = np.where(amax > 0, amax / QMAX_INT4, 1.0)
    best_error = np.full(amax.shape, np.inf)
    for ratio in CLIP_RATIOS:
        scale = np.where(amax > 0, ratio * amax / QMAX_INT4, 1.0)
        codes = np.clip(np.rint(blocks / scale[:, :, None]), QMIN_INT4, QMAX_INT4)
        error = ((codes * scale[:, :, None] - blocks) ** 2).sum(axis=2)
        better = error < best_error
        best_scale = np.where(better, scale, best_scale)
        best_error = np.where(better, error, best_error)
    return best_scale.astype(np.float32)


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, cols: int) -> np.ndarray:
    """Rebuild the float32 weight (rows, cols) from packed int4 codes and block scales.

    Args:
        packed: uint8 (rows, padded_cols // 2), layout in this module's docstring.
        scale: float32 (rows, n_blocks); block_size is padded_cols // n_blocks.
        cols: Original number of columns; trailing padding columns are dropped.

    Returns:
        float32 array (rows, cols), computed as (nibble - 8) * scale in float32.

    Raises:
        ValueError: If shapes are inconsistent with each other or with `cols`.
    """
    codes = unpack_nibbles(packed)
    rows, n_padded = codes.shape
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim != 2 or scale.shape[0] != rows or scale.shape[1] == 0 or n_padded % scale.shape[1]:
        raise ValueError(f"scale shape {scale.shape} does not fit packed codes of shape {codes.shape}")
    block_size = n_padded // scale.shape[1]
    if not 0 < cols <= n_padded or n_padded - cols >= block_size:
        raise ValueError(f"cols {cols!r} does not fit {n_padded} packed columns in blocks of {block_size}")
    blocks = codes.astype(np.float32).reshape(rows, -1, block_size) * scale[:, :, None]
    return blocks.reshape(rows, n_padded)[:, :cols]
