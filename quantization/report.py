"""What quantization cost and saved, per weight tensor and in total (numpy only).

Rows are flat dicts with units in the key names so that they can be logged as JSON lines
next to run records. Bytes count the stored weight plus its scales; biases and everything
left in fp32 are outside these rows (they are the same before and after).
"""

from __future__ import annotations

import numpy as np

from .int4 import dequantize_int4, quantize_int4
from .int8 import dequantize_int8, quantize_int8
from .schemes import QuantScheme

FP32_BYTES = 4


def _roundtrip(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, int]:
    """Quantize and dequantize `w`; returns (float32 reconstruction, stored bytes)."""
    if scheme.name == "int8":
        q, scale = quantize_int8(w)
        return dequantize_int8(q, scale), q.nbytes + scale.nbytes
    if scheme.name == "int4":
        packed, scale = quantize_int4(w, scheme.block_size)
        return dequantize_int4(packed, scale, w.shape[1]), packed.nbytes + scale.nbytes
    return w.astype(np.float32), w.size * FP32_BYTES


def tensor_report(name: str, w: np.ndarray, scheme: QuantScheme) -> dict:
    """Storage and error of quantizing one 2-D weight with `scheme`.

    Args:
        name: Qualified module name the weight belongs to.
        w: The fp32 weight, shape (rows, cols).
        scheme: Scheme to measure; "none" reports equal bytes and zero error.

    Returns:
        Dict with keys name, shape (list of ints), scheme, block_size (int4 only, else
        None), fp32_bytes, quant_bytes (codes + scales), rel_error (||w - deq|| / ||w||,
        Frobenius; 0 for an all-zero weight) and max_abs_error.
    """
    w32 = np.asarray(w, dtype=np.float32)
    deq, quant_bytes = _roundtrip(w32, scheme)
    diff = w32.astype(np.float64) - deq.astype(np.float64)
    norm = float(np.linalg.norm(w32.astype(np.float64)))
    return {
        "name": name,
        "shape": list(w32.shape),
        "scheme": scheme.name,
        "block_size": scheme.block_size if scheme.name == "int4" else None,
        "fp32_bytes": int(w32.size * FP32_BYTES),
        "quant_bytes": int(quant_bytes),
        "rel_error": float(np.linalg.norm(diff) / norm) if norm > 0 else 0.0,
        "max_abs_error": float(np.abs(diff).max()),
    }


def model_report(rows: list[dict]) -> dict:
    """Totals over `tensor_report` rows.

    Args:
        rows: One row per quantized weight.

    Returns:
        Dict with tensors (count), fp32_bytes, quant_bytes, ratio (fp32_bytes / quant_bytes,
        1.0 when empty), mean_rel_error (unweighted over tensors), max_rel_error,
        max_abs_error, and rows (the input rows, for `format_report`).
    """
    fp32_bytes = sum(r["fp32_bytes"] for r in rows)
    quant_bytes = sum(r["quant_bytes"] for r in rows)
    errors = [r["rel_error"] for r in rows]
    return {
        "tensors": len(rows),
        "fp32_bytes": fp32_bytes,
        "quant_bytes": quant_bytes,
        "ratio": fp32_bytes / quant_bytes if quant_bytes else 1.0,
        "mean_rel_error": float(np.mean(errors)) if errors else 0.0,
        "max_rel_error": max(errors, default=0.0),
        "max_abs_error": max((r["max_abs_error"] for r in rows), default=0.0),
        "rows": list(rows),
    }


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.3f}"


def format_report(report: dict) -> str:
    """A plain-text table of a `model_report`, largest tensors first, then a totals line."""
    header = (f"{'tensor':<48} {'shape':>14} {'scheme':>6} {'fp32 MiB':>9} {'quant MiB':>9} "
              f"{'rel err':>9} {'max abs':>9}")
    lines = [header, "-" * len(header)]
    for r in sorted(report["rows"], key=lambda r: (-r["fp32_bytes"], r["name"])):
        shape = "x".join(str(d) for d in r["shape"])
        scheme = r["scheme"] if r["block_size"] is None else f"{r['scheme']}/{r['block_size']}"
        lines.append(
            f"{r['name']:<48} {shape:>14} {scheme:>6} {_mib(r['fp32_bytes']):>9} "
            f"{_mib(r['quant_bytes']):>9} {r['rel_error']:>9.2e} {r['max_abs_error']:>9.2e}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"total: {report['tensors']} tensors, {_mib(report['fp32_bytes'])} MiB fp32 -> "
        f"{_mib(report['quant_bytes'])} MiB quantized ({report['ratio']:.2f}x smaller), "
        f"rel error mean {report['mean_rel_error']:.2e} max {report['max_rel_error']:.2e}"
    )
    return "\n".join(lines)
