"""Tests for edgeftl.quantization: codecs, torch modules, ONNX export, ORT and bnb paths.

Expected codes and bytes below are worked out by hand from the layouts in `int8.py` and
`int4.py`; tensors are tiny so the file runs in seconds on two shared cores.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeftl.quantization import (
    QuantScheme,
    dequantize_int4,
    dequantize_int8,
    format_report,
    model_report,
    pack_nibbles,
    parse_scheme,
    quantize_int4,
    quantize_int8,
    tensor_report,
    unpack_nibbles,
)


def _gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _export(module: nn.Module, ids: torch.Tensor, path: Path | io.BytesIO, fold: bool = False) -> None:
    """The build step's export settings: TorchScript exporter, opset 17, no folding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (ids,), path, dynamo=False, do_constant_folding=fold, opset_version=17,
                          input_names=["ids"], output_names=["out"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}})


def _ort_run(model: bytes | str, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


# ----------------------------------------------------------------------------- schemes


def test_parse_scheme_normalises_name() -> None:
    scheme = parse_scheme(" INT4 ", block_size=64)

    assert scheme == QuantScheme("int4", 64)
    assert scheme.bits == 4


@pytest.mark.parametrize("name", ["int3", "fp8", ""])
def test_unknown_scheme_name_is_rejected_by_value(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name!r}.*accepted: none, int8, int4"):
        QuantScheme(name)


@pytest.mark.parametrize("block_size", [0, -8, 4, 12, 48, True])
def test_bad_block_size_is_rejected_by_value(block_size: int) -> None:
    with pytest.raises(ValueError, match=repr(block_size)):
        QuantScheme("int4", block_size)


# ----------------------------------------------------------------------------- int8


def test_int8_hand_computed_codes_and_scales() -> None:
    # Prepare: row maxima 2.54 and 1.27 give scales 0.02 and 0.01; the zero row gets 1.0.
    w = np.array([[2.54, -1.0, 0.5], [0.0, 0.0, 0.0], [-1.27, 0.3, 0.01]], dtype=np.float32)

    # Execute
    q, scale = quantize_int8(w)

    # Assert
    np.testing.assert_array_equal(q, np.array([[127, -50, 25], [0, 0, 0], [-127, 30, 1]], dtype=np.int8))
    np.testing.assert_allclose(scale, [0.02, 1.0, 0.01], rtol=1e-6)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(dequantize_int8(q, scale), w, atol=1e-6)


def test_int8_zero_matrix_has_no_nan() -> None:
    q, scale = quantize_int8(np.zeros((2, 5), dtype=np.float32))

    assert np.all(q == 0) and np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert np.all(dequantize_int8(q, scale) == 0)


@pytest.mark.parametrize("bad", [np.zeros(4, np.float32), np.zeros((2, 2), np.int32),
                                 np.array([[1.0, np.nan]], np.float32)])
def test_int8_rejects_non_finite_or_non_matrix(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        quantize_int8(bad)


# ----------------------------------------------------------------------------- int4


def test_int4_nibble_order_low_nibble_is_even_column() -> None:
    # codes -8, 7 -> nibbles 0, 15 -> 0 + 16 * 15; codes 0, -1 -> nibbles 8, 7 -> 8 + 16 * 7
    packed = pack_nibbles(np.array([[-8, 7, 0, -1]]))

    np.testing.assert_array_equal(packed, np.array([[240, 120]], dtype=np.uint8))
    np.testing.assert_array_equal(unpack_nibbles(packed), [[-8, 7, 0, -1]])


def test_int4_hand_computed_blocks() -> None:
    # Prepare: two blocks of 8; block maxima 0.7 and 1.4 give scales 0.1 and 0.2.
    w = np.array([[0.7, -0.7, 0.1, 0.3, 0.0, 0.0, 0.0, -0.2,
                   1.4, 0.2, -0.4, 0.0, 0.0, 0.0, 0.0, -1.4]], dtype=np.float32)
    # codes [7,-7,1,3,0,0,0,-2 | 7,1,-2,0,0,0,0,-7] -> nibbles +8 -> low + 16 * high per pair
    expected = [[15 + 16 * 1, 9 + 16 * 11, 8 + 16 * 8, 8 + 16 * 6,
                 15 + 16 * 9, 6 + 16 * 8, 8 + 16 * 8, 8 + 16 * 1]]

    # Execute
    packed, scale = quantize_int4(w, block_size=8)

    # Assert
    np.testing.assert_array_equal(packed, np.array(expected, dtype=np.uint8))
    np.testing.assert_allclose(scale, [[0.1, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(dequantize_int4(packed, scale, cols=16), w, atol=1e-6)


def test_int4_pads_last_block_and_zero_blocks_are_finite() -> None:
    # Prepare: 12 columns in blocks of 8 -> padded to 16; the second row is all zero.
    w = np.vstack([_gaussian(1, 12), np.zeros((1, 12), np.float32)])

    # Execute
    packed, scale = quantize_int4(w, block_size=8)
    deq = dequantize_int4(packed, scale, cols=12)

    # Assert: padding columns 12..15 are code 0 (nibble 8), so bytes 6, 7 hold 8 + 16 * 8.
    assert packed.shape == (2, 8) and scale.shape == (2, 2)
    np.testing.assert_array_equal(packed[:, 6:], 136)
    assert deq.shape == (2, 12) and np.all(np.isfinite(deq))
    np.testing.assert_array_equal(deq[1], 0.0)
    with pytest.raises(ValueError, match="cols"):
        dequantize_int4(packed, scale, cols=5)


@pytest.mark.parametrize(("scheme", "bound"), [(QuantScheme("int8"), 0.01), (QuantScheme("int4", 32), 0.1)])
def test_relative_error_bounds_on_gaussian(scheme: QuantScheme, bound: float) -> None:
    row = tensor_report("w", _gaussian(64, 128), scheme)

    assert 0 < row["rel_error"] < bound


# ----------------------------------------------------------------------------- report


def test_report_counts_codes_plus_scales() -> None:
    # Prepare / Execute: 64 x 128 fp32 = 32768 B. int8: 8192 codes + 64 scales * 4 B.
    # int4 / 32: 4096 packed bytes + 64 rows * 4 blocks * 4 B.
    w = _gaussian(64, 128)
    rows = [tensor_report("a", w, QuantScheme("int8")), tensor_report("b", w[:8], QuantScheme("int4", 32))]
    report = model_report(rows)
    text = format_report(report)

    # Assert
    assert (rows[0]["fp32_bytes"], rows[0]["quant_bytes"]) == (32768, 8192 + 256)
    assert (rows[1]["fp32_bytes"], rows[1]["quant_bytes"]) == (4096, 512 + 128)
    assert report["fp32_bytes"] == 32768 + 4096 and report["quant_bytes"] == 8448 + 640
    assert report["ratio"] == pytest.approx((32768 + 4096) / (8448 + 640))
    assert report["max_rel_error"] == rows[1]["rel_error"]
    assert text.index("\na ") < text.index("\nb ")  # largest tensor first
    assert "total: 2 tensors" in text


def test_report_for_none_scheme_is_lossless() -> None:
    row = tensor_report("w", _gaussian(4, 8), QuantScheme("none"))

    assert row["quant_bytes"] == row["fp32_bytes"] == 128 and row["rel_error"] == 0.0
