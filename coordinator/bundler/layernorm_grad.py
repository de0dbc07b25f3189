"""Spell out LayerNorm's and RMSNorm's input gradients with plain ONNX ops in the training graph.

ORT's gradient builder emits one `LayerNormalizationGrad` node per LayerNorm (BERT) and one
`SimplifiedLayerNormalizationGrad` per RMSNorm (Llama). Their shared CPU kernel in
onnxruntime-training 1.19.2 is single-threaded Eigen code that allocates three full-size
temporaries per call and always computes the scale and bias gradients too. Profiled on MiniLM,
batch 16 x 128, 2 threads: 11.8 ms per call, 14% of a top-2 split bundle's step (4 calls, 47 ms)
and ~12% of a full-depth one's (12 calls).

Our LayerNorm weights are frozen (only adapters and the head train), so only the input gradient
is needed. With x_hat = (x - mean) * inv_std and g = dy * scale (per row, over the last axis):

    dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))

which is what the fused kernel computes for dx (B - mean(B) - x_hat * mean(C) with
B = g * inv_std, C = B * x_hat). RMSNorm has no mean: x_hat = x * inv_std and the mean(g) term
goes. As Sub / Mul / ReduceMean nodes it runs on ORT's thread pool:
the same step's four LayerNorm gradients took 9 ms instead of 47, with parameter updates equal
to 7e-9 (float rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
SUFFIX = "_dx"
# gradient op -> its input count: (dy, x, scale, mean, inv_std) / (dy, x, scale, inv_std)
GRAD_OPS = {"LayerNormalizationGrad": 5, "SimplifiedLayerNormalizationGrad": 4}


def decompose_layernorm_grads(model: onnx.ModelProto) -> int:
    """Replace (Simplified)LayerNormalizationGrad nodes whose scale / bias gradients nobody reads.

    Rewrites `model` in place.

    A node is left as it is when its scale or bias gradient is used (a trainable LayerNorm) or
    it normalizes over more than the last axis. The graph must be float32 (mean and inv_std
    are stashed as float32, as edgeftl's exports do).

    Returns:
        The number of nodes replaced.
    """
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    new_nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if not _replaceable(node, read):
            new_nodes.append(node)
            continue
        new_nodes += _input_gradient(node, f"{node.name or node.op_type}_{replaced}{SUFFIX}", graph, opset)
        replaced += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return replaced


def _replaceable(node: onnx.NodeProto, read: set[str]) -> bool:
    if node.domain != MS_DOMAIN or GRAD_OPS.get(node.op_type) != len(node.input):
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis == -1 and not any(name and name in read for name in node.output[1:])


def _input_gradient(node: onnx.NodeProto, prefix: str, graph: onnx.GraphProto, opset: int) -> list[onnx.NodeProto]:
    """Nodes computing `node`'s first output, dx, from (dy, x, scale[, mean], inv_std)."""
    dy, x, scale, *mean, inv_std = node.input

    def name(part: str) -> str:
        return f"{prefix}/{part}"

    def op(kind: str, inputs: list[str], output: str) -> onnx.NodeProto:
        return helper.make_node(kind, inputs, [output], name=output)

    def row_mean(source: str, output: str) -> onnx.NodeProto:
        if opset >= 18:  # axes became an input in opset 18
            axes = f"{output}_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
            return helper.make_node("ReduceMean", [source, axes], [output], name=output, keepdims=1)
        return helper.make_node("ReduceMean", [source], [output], name=output, axes=[-1], keepdims=1)

    centered = [op("Sub", [x, mean[0]], name("centered"))] if mean else []
    nodes = [
        *centered,
        op("Mul", [name("centered") if mean else x, inv_std], name("x_hat")),
        op("Mul", [dy, scale], name("g")),
        op("Mul", [name("g"), name("x_hat")], name("g_x_hat")),
        row_mean(name("g_x_hat"), name("mean_g_x_hat")),
        op("Mul", [name("x_hat"), name("mean_g_x_hat")], name("projection")),
    ]
    if mean:  # LayerNorm also removes the gradient's row mean
        nodes += [row_mean(name("g"), name("mean_g")), op("Sub", [name("g"), name("mean_g")], name("g_centered"))]
    g = name("g_centered") if mean else name("g")
    return [*nodes, op("Sub", [g, name("projection")], name("dx_scaled")),
            op("Mul", [name("dx_scaled"), inv_std], node.output[0])]
