"""Quantize an inference-only fp32 ONNX graph (the frozen lower backbone) for ONNX Runtime.

Unlike `modules.py`, whose graphs must stay trainable above the quantized weights, this graph
is never differentiated, so it may use ONNX Runtime's integer kernels:

- MatMul, "int8": ONNX Runtime's MatMulNBits contrib op with bits=8: per column of W, one
  symmetric int8 scale per `INT8_BLOCK` values; with `INT8_ACCURACY_LEVEL` 4 the CPU kernel
  also quantizes activations to int8, per token and per block of `INT8_BLOCK` channels, so an
  outlier token or channel only coarsens its own block. The previous scheme, `quantize_dynamic`
  (DynamicQuantizeLinear per TENSOR on activations + MatMulInteger), kept MiniLM's logits at
  0.994 cosine but not a language model: SmolLM2-135M's hidden states carry a few values far
  larger than the rest, and an int8 top-2 bundle's evaluation loss was +0.40 nats per token
  over fp32 PyTorch (+0.0099 with this scheme; fp32 activations: +0.0057; an fp32 lower stack
  under the same int8 top blocks: +0.0045). Gemm nodes (2-D inputs, none in the BERT or Llama
  exports) still go through `quantize_dynamic`: int8 per-channel weights, `reduce_range=True`
  (7-bit weights: on x86 CPUs without VNNI the u8 x s8 kernel saturates its int16 pair sums).
- MatMul, "int4": ONNX Runtime's MatMulNBits contrib op, packed by this package's `int4.py`
  (same nibble order, zero point 8 = its default). ORT's own `MatMul4BitsQuantizer` cannot
  be imported from onnxruntime-training-cpu 1.19.2: its native `quantize_matmul_4bits` is
  missing from that build. MatMulNBits needs block_size >= 16. Gemm nodes get int8.
- Gather on a float table (embeddings), both schemes: int8 per row, as in
  `QuantEmbedding` (Gather int8 rows, Cast, Mul by the gathered row scale). ORT's own
  Gather quantization is per tensor: on MiniLM's word embeddings its error was 3.2 % (worst
  row 14 %) against 0.7 % per row. (int4 Gather, GatherBlockQuantized, is not in this build.)

Measured once on real MiniLM-L6 (4 sentences, last hidden state over real tokens, vs fp32) with
the previous int8 scheme: 14 % relative error (mean-pooled cosine >= 0.991), almost all of it
from the dynamic per-tensor quantization of activations (weight-only int8 in `modules.py`: 3 %,
cosine 0.9996); int4 here 26 % (cosine >= 0.958), the same as weight-only int4 in `modules.py`.

Host-side only: `onnxruntime.quantization` imports `onnx`, and in this environment importing
`onnxruntime` at all imports torch (onnxruntime-training's start-up check loads ORTModule
whenever torch is installed). Models must fit in one protobuf (< 2 GiB, no external data);
only the top-level graph is rewritten (no If / Loop bodies).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeftl.device.protocol import blockquant

from .int4 import quantize_int4
from .int8 import quantize_int8
from .schemes import QuantScheme

MS_DOMAIN = "com.microsoft"
MIN_NBITS_BLOCK = 16  # MatMulNBits accepts power-of-two blocks from 16 up
# int8 MatMul weights: one scale per 64 values of a column (6 % over 1 byte a weight). 64 divides
# MiniLM's 384 / 1536 and SmolLM2's 576 / 1536, so no padding; per whole column was the old
# per-channel layout, and smaller blocks only cost bytes.
INT8_BLOCK = 64
# MatMulNBits' accuracy_level for int8: 0 multiplies in fp32 after dequantizing the weights
# (SmolLM2 int8 top-2: +0.0057 nats, 230 ms per 128-token example on this host's AVX2); 4
# quantizes activations to int8 per token and per block of 64 channels (+0.0099 nats, 108 ms;
# the old per-tensor scheme: +0.398 nats, 59 ms). See docs/BENCHMARKS.md bench_build_llm.
INT8_ACCURACY_LEVEL = 4


def quantize_onnx_inference(src: Path, dst: Path, scheme: QuantScheme) -> None:
    """Write a weight-quantized copy of an inference-only fp32 ONNX model.

    Args:
        src: fp32 model file. Weights may reach MatMul through Transpose nodes (export with
            `do_constant_folding=False`); those Transposes are folded first.
        dst: Output file; its folder must exist.
        scheme: "none" copies `src`; "int8" and "int4" as in this module's docstring.

    Raises:
        ValueError: If "int4" is asked with a block size below 16.
    """
    src, dst = Path(src), Path(dst)
    if scheme.name == "none":
        shutil.copyfile(src, dst)
        return
    if scheme.name == "int4" and scheme.block_size < MIN_NBITS_BLOCK:
        raise ValueError(
            f"block_size {scheme.block_size!r} is too small for ONNX Runtime's MatMulNBits; "
            f"accepted: a power of two >= {MIN_NBITS_BLOCK}"
        )
    model = onnx.load(str(src))
    fold_weight_transposes(model.graph)
    quantize_gathers_int8(model.graph)
    if scheme.name == "int4":
        matmuls_to_nbits(model, scheme.block_size, bits=4)
    else:
        matmuls_to_nbits(model, INT8_BLOCK, bits=8)
    remove_unused_initializers(model.graph)
    _quantize_dynamic_int8(model, dst, ["Gemm"])


def int8_lower_as_before(src: Path, dst: Path) -> int:
    """Write `src`, an int8 lower stack of this module (8-bit MatMulNBits), with the scheme int8
    lower stacks had before it: each MatMulNBits back to MatMul on its dequantized weights, then
    `quantize_dynamic` (per-tensor activations, MatMulInteger). ONNX Runtime Training 1.19.2's
    MatMulNBits runs only 4 bits, so the benchmark twin that trains a bundle as devices did on
    that build (tools/bench_device.py) needs this form. Returns the MatMulNBits nodes rewritten."""
    model = onnx.load(str(src))
    inits = _initializers(model.graph)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        bits = next((a.i for a in node.attribute if a.name == "bits"), 0)
        if node.op_type != "MatMulNBits" or bits != 8:
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        codes = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1, block).astype(np.float32) - 128.0
        scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1, 1)
        weight = (codes * scale).reshape(n, -1)[:, :k].T  # (K, N), as MatMul(x, W) reads it
        name = f"{node.input[1]}_dequantized"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight, dtype=np.float32), name)
            model.graph.initializer.append(inits[name])
        nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        count += 1
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    remove_unused_initializers(model.graph)
    _quantize_dynamic_int8(model, Path(dst), ["MatMul", "Gemm"])
    return count


def _quantize_dynamic_int8(model: onnx.ModelProto, dst: Path, op_types: list[str]) -> None:
    """int8 per-channel weights for `op_types` nodes with constant weights, written to `dst`."""
    # Imported here: this pulls in the quantization tool chain, which callers of the
    # graph passes below do not need.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic rewrites a ModelProto it is given into external-data form in a temp
    # folder it then deletes: the proto must not be used afterwards (ours is not). It logs a
    # "consider pre-processing" advice through the root logger, over the build's progress bar;
    # the graph here is already what that pre-processing would make of it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(model, dst, op_types_to_quantize=op_types, per_channel=True,
                         reduce_range=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Names of all tensors some node or graph output reads (top-level graph only)."""
    return {inp for node in graph.node for inp in node.input} | {out.name for out in graph.output}


def fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Make weights that reach a node through Transpose or Identity plain initializers.

    torch's exporter without constant folding feeds `linear.weight` (out, in) to MatMul
    through a Transpose, and with folding it may alias a shared weight through an Identity;
    the quantizers only recognise weights that are initializers. A Transpose becomes a
    transposed initializer; an Identity is bypassed (its readers read the initializer).

    Returns:
        Number of nodes removed.
    """
    inits = _initializers(graph)
    outputs = {out.name for out in graph.output}
    renames: dict[str, str] = {}
    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("Transpose", "Identity") or node.input[0] not in inits:
            continue
        if node.op_type == "Identity" and node.output[0] not in outputs:
            renames[node.output[0]] = node.input[0]
        elif node.op_type == "Transpose":
            arr = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            graph.initializer.append(numpy_helper.from_array(np.transpose(arr, perm), node.output[0]))
        else:
            continue
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    return len(folded)


def quantize_gathers_int8(graph: onnx.GraphProto) -> int:
    """Rewrite Gather(float table, ids) on axis 0 as int8 rows times gathered row scales.

    The table (vocab, hidden) becomes an int8 initializer plus a float32 (vocab, 1) scale
    initializer (layout of `int8.py`); a lookup dequantizes only the gathered rows.

    Returns:
        Number of Gather nodes rewritten.
    """
    inits = _initializers(graph)
    done: dict[str, tuple[str, str]] = {}  # table name -> (codes name, scales name)
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        if table.name not in done:
            q, scale = quantize_int8(numpy_helper.to_array(table))
            names = (f"{table.name}_q8", f"{table.name}_scale")
            graph.initializer.append(numpy_helper.from_array(q, names[0]))
            graph.initializer.append(numpy_helper.from_array(scale.reshape(-1, 1), names[1]))
            done[table.name] = names
        codes, scales = done[table.name]
        out, ids = node.output[0], node.input[1]
        new_nodes += [
            helper.make_node("Gather", [codes, ids], [f"{out}_q8"], name=f"{node.name}_q8", axis=0),
            helper.make_node("Cast", [f"{out}_q8"], [f"{out}_f32"], name=f"{node.name}_cast",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [scales, ids], [f"{out}_scale"], name=f"{node.name}_scale", axis=0),
            helper.make_node("Mul", [f"{out}_f32", f"{out}_scale"], [out], name=f"{node.name}_dq"),
        ]
        count += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return count


def matmuls_to_nbits(model: onnx.ModelProto, block_size: int, bits: int = 4) -> int:
    """Replace MatMul(x, W) with a 2-D float initializer W (K, N) by weight-only MatMulNBits.

    MatMulNBits takes B as uint8 (N, n_blocks, block_size * bits // 8): row n is column n of W.
    4 bits: `quantize_int4(W.T)`, whose packing and symmetric zero point 8 are its format.
    8 bits: `quantize_int8` of each block of a row (symmetric, codes + 128: its default zero
    point). Without an `accuracy_level` the CPU kernel dequantizes B and multiplies in fp32, so
    activations are never quantized.

    Returns:
        Number of MatMul nodes replaced.
    """
    graph = model.graph
    inits = _initializers(graph)
    done: dict[str, tuple[str, str]] = {}  # weight name -> (packed name, scales name)
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        k, n = weight.dims
        if weight.name not in done:
            packed, scale = _pack_nbits(numpy_helper.to_array(weight).T, block_size, bits)
            names = (f"{weight.name}_q{bits}", f"{weight.name}_q{bits}_scale")
            graph.initializer.append(numpy_helper.from_array(packed.reshape(n, -1, block_size * bits // 8), names[0]))
            graph.initializer.append(numpy_helper.from_array(scale.reshape(-1), names[1]))
            done[weight.name] = names
        accuracy = {"accuracy_level": INT8_ACCURACY_LEVEL} if bits == 8 and INT8_ACCURACY_LEVEL else {}
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], *done[weight.name]], list(node.output),
            name=f"{node.name}_q{bits}", domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block_size, **accuracy,
        ))
        count += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if done and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return count


def _pack_nbits(rows: np.ndarray, block_size: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 (N, padded K * bits // 8), scales (N, n_blocks)) of `rows` (N, K) for MatMulNBits."""
    if bits == 4:
        return quantize_int4(rows, block_size)
    n, k = rows.shape
    padded = np.zeros((n, blockquant.padded_size(k, block_size)), dtype=rows.dtype)
    padded[:, :k] = rows
    codes, scale = quantize_int8(padded.reshape(-1, block_size))  # one int8 scale per block
    return (codes.astype(np.int16) + 128).astype(np.uint8).reshape(n, -1), scale.reshape(n, -1)


def remove_unused_initializers(graph: onnx.GraphProto) -> int:
    """Drop initializers no node or graph output reads any more; returns how many."""
    read = _read_names(graph)
    unused = [t for t in graph.initializer if t.name not in read]
    for t in unused:
        graph.initializer.remove(t)
    return len(unused)
