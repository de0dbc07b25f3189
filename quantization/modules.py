"""Torch modules holding frozen weights quantized, dequantized inside forward.

Built for `torch.onnx.export(..., dynamo=False, do_constant_folding=False, opset_version=17)`:
the quantized tensors are buffers, so they become int8 / uint8 initializers, and the
dequantization becomes graph nodes (Cast, Mul, and for int4 Div, Floor, Sub, Reshape), using
no bitwise ops (opset 17 has no BitwiseAnd). The build step lists these initializers as
frozen params, so an ONNX Runtime Training checkpoint stores 1 or 0.5 byte per weight.

Layouts are those of `int8.py` and `int4.py` (nibble order: `edgeftl.device.protocol.blockquant`);
quantization itself runs once, in numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeftl.device.protocol.blockquant import NIBBLE_OFFSET

from .int4 import padded_cols, quantize_int4
from .int8 import quantize_int8
from .report import tensor_report
from .schemes import QuantScheme


def _quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight with `scheme`; returns (codes, scales) as CPU tensors."""
    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    if scheme.name == "int8":
        q, scale = quantize_int8(w)
    elif scheme.name == "int4":
        q, scale = quantize_int4(w, scheme.block_size)
    else:
        raise ValueError(f"scheme {scheme.name!r} has no quantized module; accepted: 'int8', 'int4'")
    return torch.from_numpy(q), torch.from_numpy(scale)


def _dequantize_rows(q: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme, cols: int) -> torch.Tensor:
    """Dequantize a 2-D stack of rows: (rows, stored) -> float32 (rows, cols).

    int8: q int8 (rows, cols), scale (rows, 1). int4: q packed uint8 (rows, padded_cols // 2),
    scale (rows, n_blocks). `rows` may be dynamic (gathered embedding rows); every other
    size is a Python int here, so the exported Reshapes take constant shapes.
    """
    if scheme.name == "int8":
        return q.to(torch.float32) * scale
    block_size = scheme.block_size
    n_blocks = padded_cols(cols, block_size) // block_size
    # Nibbles by float arithmetic: every value is a small integer and 16 is a power of two,
    # so division and floor are exact, and opset 17 has the ops (Div, Floor, Mul, Sub).
    packed = q.to(torch.float32)
    high = torch.floor(packed / 16.0)
    low = packed - high * 16.0
    nibbles = torch.stack((low, high), dim=-1)  # (rows, bytes, 2): low nibble = even column
    codes = (nibbles - float(NIBBLE_OFFSET)).reshape(-1, n_blocks, block_size)
    w = (codes * scale.unsqueeze(-1)).reshape(-1, n_blocks * block_size)  # (rows, padded_cols)
    return w if n_blocks * block_size == cols else w[:, :cols]


class QuantLinear(nn.Module):
    """Frozen `nn.Linear` whose weight is stored int8 (per row) or packed int4 (per block).

    Buffers: `weight_q` (int8 (out, in), or uint8 (out, padded_in // 2)), `weight_scale`
    (float32 (out,) or (out, n_blocks)) and `bias` (float32 (out,) or None). Nothing is a
    parameter: the layer is frozen and trained only through adapters around it.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme,
                 weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantLinear:
        """Quantize `linear`'s weight with `scheme` ("int8" or "int4") and copy its bias.

        Raises:
            ValueError: If the scheme is "none" (nothing to quantize).
        """
        weight_q, weight_scale = _quantize_weight(linear.weight, scheme)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        return cls(linear.in_features, linear.out_features, scheme, weight_q, weight_scale, bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight (out, in) this layer multiplies with."""
        scale = self.weight_scale.unsqueeze(-1) if self.scheme.name == "int8" else self.weight_scale
        return _dequantize_rows(self.weight_q, scale, self.scheme, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), as `F.linear` with the dequantized weight."""
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class QuantEmbedding(nn.Module):
    """Frozen `nn.Embedding` whose table is stored int8 (per row) or packed int4 (per block).

    Forward gathers the looked-up rows of the integer table and of the scales, then
    dequantizes only those rows: the fp32 table (vocab, hidden) is never materialised,
    which is what keeps a device's resident memory low. `padding_idx`, `max_norm` and
    sparse gradients are dropped: they only matter while the table is trained.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme,
                 weight_q: torch.Tensor, weight_scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.scheme = scheme
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: QuantScheme) -> QuantEmbedding:
        """Quantize `embedding`'s table with `scheme` ("int8" or "int4").

        Raises:
            ValueError: If the scheme is "none" (nothing to quantize).
        """
        weight_q, weight_scale = _quantize_weight(embedding.weight, scheme)
        return cls(embedding.num_embeddings, embedding.embedding_dim, scheme, weight_q, weight_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Integer ids (...) -> float32 vectors (..., embedding_dim)."""
        flat_ids = ids.reshape(-1)  # rows are dequantized as one 2-D stack
        rows_q = F.embedding(flat_ids, self.weight_q)  # (n, stored): int8 or packed uint8
        # (n, 1) for int8, (n, n_blocks) for int4
        rows_scale = F.embedding(flat_ids, self.weight_scale.reshape(self.num_embeddings, -1))
        rows = _dequantize_rows(rows_q, rows_scale, self.scheme, self.embedding_dim)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"


def quantize_module_(root: nn.Module, scheme: QuantScheme, skip: Callable[[str, nn.Module], bool],
                     report_rows: list[dict] | None = None) -> list[str]:
    """Replace, in place, every nn.Linear / nn.Embedding under `root` not skipped.

    `skip(name, module)` is asked once per candidate, by qualified name (as in
    `root.named_modules()`); callers skip e.g. names containing "lora_" and the classifier
    head. Subclasses of nn.Linear count as candidates: skip those whose owner reads
    `.weight` directly (e.g. `nn.MultiheadAttention.out_proj`). A module reachable under
    two names is replaced once, under its first name; tied weights held by two different
    modules (an LM head tied to the embedding) are quantized twice, once per module.

    Args:
        root: Module tree modified in place.
        scheme: "none" makes this a no-op returning [].
        skip: Predicate; True keeps that module in fp32.
        report_rows: If given, one `tensor_report` row per replaced weight is appended,
            computed from the fp32 weight before it is dropped (this quantizes each weight
            a second time, in numpy). Names stay the return value so that callers that only
            need them pay nothing for error statistics.

    Returns:
        Qualified names of the replaced modules, in `named_modules()` order.

    Raises:
        ValueError: If `root` itself is a candidate (it has no parent to re-attach to).
    """
    if scheme.name == "none":
        return []
    targets = [(name, mod) for name, mod in root.named_modules()
               if isinstance(mod, (nn.Linear, nn.Embedding)) and not skip(name, mod)]
    replaced: list[str] = []
    for name, module in targets:
        if not name:
            raise ValueError(f"root itself is a {type(module).__name__}; wrap it in a container module")
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if isinstance(module, nn.Linear):
            new: nn.Module = QuantLinear.from_linear(module, scheme)
        else:
            new = QuantEmbedding.from_embedding(module, scheme)
        new.to(module.weight.device)
        if report_rows is not None:
            weight = module.weight.detach().to(device="cpu", dtype=torch.float32).numpy()
            report_rows.append(tensor_report(name, np.asarray(weight), scheme))
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced
