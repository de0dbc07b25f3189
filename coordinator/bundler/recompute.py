"""Recompute dequantized weights in the backward pass instead of holding them from the forward.

A quantized frozen weight W = dequant(q, scale) feeds its MatMul twice: in the forward pass and,
for the input gradient dX = dY @ W, in the backward pass. ORT keeps the fp32 W alive from one
to the other, so during backpropagation every layer's dequantized weights are resident at once
(42 MB for MiniLM), which is what made int8 bundles no smaller than fp32 at peak.

This pass gives each backward use its own copy of the dequantization subgraph. The copy starts
with `DequantizeLinear(q, 1.0)` where the forward starts with `Cast(q)`: the same values, but a
different op, so ORT's common-subexpression elimination cannot merge the two chains back, and
DequantizeLinear is never constant-folded. ORT orders nodes by a reverse DFS from the outputs,
so the copy runs right before its backward consumer and its output dies right after it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

SUFFIX = "_recompute"


def recompute_dequantized_weights(model: onnx.ModelProto, frozen: set[str]) -> int:
    """Rewire backward consumers of frozen-weight-derived tensors to recomputed copies (in place).

    Args:
        model: the ORT training graph (forward + gradient nodes).
        frozen: names of the frozen parameters (graph inputs fed from the checkpoint).

    Returns:
        The number of backward inputs rewired.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constant = _constant_derived(graph, frozen)
    clones: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    one = "edgeftl_dq_unit_scale"  # added to the graph only if a copy reads it

    def clone(tensor: str) -> str:
        if tensor in clones:
            return clones[tensor]
        node = producer.get(tensor)
        if node is None:  # a frozen parameter or initializer: shared, never copied
            return tensor
        inputs = [clone(name) if name else name for name in node.input]
        outputs = [name + SUFFIX for name in node.output]
        if node.op_type == "Cast" and node.input[0] in frozen:
            copy = helper.make_node("DequantizeLinear", [node.input[0], one], outputs, name=node.name + SUFFIX)
        else:
            copy = helper.make_node(node.op_type, inputs, outputs, name=node.name + SUFFIX, domain=node.domain)
            copy.attribute.extend(node.attribute)
        new_nodes.append(copy)
        for old, new in zip(node.output, outputs):
            clones[old] = new
        return clones[tensor]

    rewired = 0
    for node in graph.node:
        if not is_backward(node):
            continue
        for index, name in enumerate(node.input):
            if name in constant and name in producer and _has_quantized_source(name, producer, frozen):
                node.input[index] = clone(name)
                rewired += 1
    if rewired:
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), one))
        insert_before_backward(graph, new_nodes)
    return rewired


def is_backward(node: onnx.NodeProto) -> bool:
    """A gradient node: ORT's gradient builder names them `<forward node>_Grad/...`."""
    return "_Grad" in node.name


def insert_before_backward(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Put recomputation nodes just before the first backward node (a valid topological position;
    ORT then runs each one right before its readers)."""
    existing = list(graph.node)
    position = next(i for i, n in enumerate(existing) if is_backward(n))
    del graph.node[:]
    graph.node.extend(existing[:position] + nodes + existing[position:])


def _constant_derived(graph: onnx.GraphProto, frozen: set[str]) -> set[str]:
    """Tensors computed only from frozen parameters, initializers and Constant nodes."""
    constant = set(frozen) | {init.name for init in graph.initializer}
    for node in graph.node:  # graph.node is topologically sorted
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    return constant


def _has_quantized_source(tensor: str, producer: dict, frozen: set[str]) -> bool:
    """True if the tensor's subgraph starts with a Cast of a frozen integer weight."""
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type == "Cast" and node.input[0] in frozen:
            return True
        stack.extend(node.input)
    return False
