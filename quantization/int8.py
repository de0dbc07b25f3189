"""Symmetric per-row int8 weight quantization (numpy only, so either side can read it).

Codes and scales are `device/protocol/blockquant.py`'s with one block per row (the update
codecs share them). Layout, relied on by `modules.py`, the build step and any device-side reader:

- `q`: int8, same shape as the weight (rows, cols), values in [-127, 127]. -128 is never
  written (the scale is max|row| / 127), so negation stays representable and the range is
  symmetric around zero.
- `scale`: float32, shape (rows,). `w[r, c] ~= q[r, c] * scale[r]`.

A row is an output channel of a linear weight (out_features, in_features) or one token's
vector of an embedding table (vocab, hidden): a token's row is then dequantized on its own
after a gather, without reading the rest of the table.
"""

from __future__ import annotations

import numpy as np

from edgeftl.device.protocol import blockquant

BITS = 8


def _check_matrix(w: np.ndarray) -> np.ndarray:
    """Return `w` as a float64 2-D array, or raise naming what was wrong with it."""
    arr = np.asarray(w)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D weight (rows, cols), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"expected a non-empty weight, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a floating-point weight, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("weight contains NaN or infinite values; they cannot be quantized")
    # float64 so that rounding w / scale does not depend on float32 division error.
    return arr.astype(np.float64)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D weight to int8 with one symmetric scale per row.

    scale = max|row| / 127 and q = round_half_even(w / scale). An all-zero row gets
    scale 1.0 (any positive scale would do: its q is all zeros), so no NaN appears.

    Args:
        w: Floating-point weight, shape (rows, cols).

    Returns:
        `(q, scale)`: q int8 (rows, cols) in [-127, 127]; scale float32 (rows,).

    Raises:
        ValueError: If `w` is not 2-D, empty, not floating point, or not finite.
    """
    w64 = _check_matrix(w)
    scale = blockquant.block_scales(w64, BITS).astype(np.float32)  # one block per row
    # Divide by the stored float32 scale, so q is the best code for the scale readers get.
    return blockquant.block_codes(w64, scale.astype(np.float64), BITS), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Rebuild the float32 weight from int8 codes and per-row scales.

    Args:
        q: int8 codes, shape (rows, cols).
        scale: float32 per-row scales, shape (rows,).

    Returns:
        float32 array (rows, cols) equal to `q * scale[:, None]` computed in float32, the
        same arithmetic the torch and ONNX graphs do.

    Raises:
        ValueError: If dtypes or shapes do not match the layout above.
    """
    q = np.asarray(q)
    scale = np.asarray(scale)
    if q.dtype != np.int8 or q.ndim != 2:
        raise ValueError(f"expected int8 codes of shape (rows, cols), got {q.dtype} {q.shape}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"expected scale of shape ({q.shape[0]},), got {scale.shape}")
    return blockquant.dequantize(q, scale)
