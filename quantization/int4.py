"""Symmetric block-wise int4 weight quantization with two codes per byte (numpy only).

The codes, scales and nibble layout are `device/protocol/blockquant.py`'s (the update codecs
share them, and ONNX Runtime's MatMulNBits reads the same nibble order, so `ort_int.py` hands
these bytes to it unchanged). What is particular to weights:

- Each row (output channel of a linear weight, or token vector of an embedding table) is cut
  into blocks of `block_size` consecutive columns. If `cols` is not a multiple of
  `block_size`, the row is padded on the right with zeros up to `padded_cols`; the padding is
  stored (as code 0) and dropped again by `dequantize_int4(..., cols)`, so callers must keep
  the original `cols`. (MiniLM's 384 and 1536 divide by 32 and 128: no padding there.)
- `scale`: float32, shape (rows, padded_cols // block_size): per block, `ratio * max|block| / 7`
  for the clipping ratio in `CLIP_RATIOS` with the least squared error (1.0 for an all-zero
  block). Ratio 1 is blockquant's plain scale; smaller ones clip the block's largest values,
  which is when code -8 occurs.
- `packed`: uint8, shape (rows, padded_cols // 2): `packed[r, j] = (q[r, 2j] + 8) + 16 * (q[r, 2j + 1] + 8)`.
"""

from __future__ import annotations

import numpy as np

from edgeftl.device.protocol import blockquant

from .int8 import _check_matrix

BITS = 4


def padded_cols(cols: int, block_size: int) -> int:
    """Columns after right-padding `cols` up to a whole number of blocks."""
    return blockquant.padded_size(cols, block_size)


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
    # Divide by the stored float32 scale, so each code is the best one for the scale readers get.
    codes = blockquant.block_codes(blocks, scale.astype(np.float64), BITS).reshape(rows, -1)
    return blockquant.pack_nibbles(codes), scale


# Clipping ratios tried per block: scale = ratio * max|w| / 7. With only 16 levels, clipping a
# block's few largest values buys finer steps for all the others; the ratio with the lowest
# squared error wins, per block (the grid search of llama.cpp / AWQ-style clipping, without
# activation statistics). Ratio 1.0 (no clipping) is always a candidate, so it never does worse.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _search_scales(blocks: np.ndarray) -> np.ndarray:
    """Per-block scale minimising the squared quantization error; blocks (rows, n_blocks, size)."""
    amax = np.abs(blocks).max(axis=2)
    levels = blockquant.LEVELS[BITS]
    best_scale = np.where(amax > 0, amax / levels, 1.0)
    best_error = np.full(amax.shape, np.inf)
    for ratio in CLIP_RATIOS:
        scale = np.where(amax > 0, ratio * amax / levels, 1.0)
        codes = blockquant.block_codes(blocks, scale, BITS)
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
    packed = np.asarray(packed)
    if packed.ndim != 2:
        raise ValueError(f"expected packed uint8 of shape (rows, bytes), got {packed.dtype} {packed.shape}")
    codes = blockquant.unpack_nibbles(packed)
    rows, n_padded = codes.shape
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim != 2 or scale.shape[0] != rows or scale.shape[1] == 0 or n_padded % scale.shape[1]:
        raise ValueError(f"scale shape {scale.shape} does not fit packed codes of shape {codes.shape}")
    block_size = n_padded // scale.shape[1]
    if not 0 < cols <= n_padded or n_padded - cols >= block_size:
        raise ValueError(f"cols {cols!r} does not fit {n_padded} packed columns in blocks of {block_size}")
    blocks = blockquant.dequantize(codes.reshape(rows, -1, block_size), scale)
    return blocks.reshape(rows, n_padded)[:, :cols]
