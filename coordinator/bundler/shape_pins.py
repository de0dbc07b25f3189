"""Pin the backward pass's shape reads to the forward, so forward activations read only for their shape die early.

The gradient of a Reshape (and of broadcasting ops) needs its forward input's *shape*, so ORT's
gradient builder adds `Shape(x)` nodes to the backward pass that read forward tensors such as
each attention block's query/key/value projections. ONNX Runtime keeps a tensor until its last
reader has run, and where that `Shape` runs is up to the session's topological sort: in the
training build (1.19.2) it ran right after `x` was made; stock onnxruntime 1.32 runs it when the
backward pass needs the shape, so every block's projections stayed resident through the
forward pass. Measured on MiniLM int8, batch 16 x 128: 76 MiB more live memory at the peak
(428 MiB peak RSS against the training build's 336), with the same graph.

This pass makes the placement part of the graph instead of the scheduler's choice: each such
`Shape(x)` moves next to `x`'s producer, and the forward readers of `x` read
`Reshape(x, Shape(x))` instead, a no-op (ORT's Reshape returns its input's buffer) that cannot
run before the `Shape`. The shape is then taken while `x` is live anyway, and `x` is freed after
its last forward reader. MiniLM int8, 16 x 128, onnxruntime 1.32: peak 428 -> 348 MiB, step
time unchanged within noise.
"""

from __future__ import annotations

import onnx
from onnx import helper

from edgeftl.coordinator.bundler.recompute import is_backward

SUFFIX = "_shape_pinned"


def pin_shape_reads(graph: onnx.GraphProto) -> int:
    """Move backward `Shape` reads of forward tensors into the forward pass (in place).

    Returns:
        The number of tensors pinned.
    """
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    moved: dict[str, list[onnx.NodeProto]] = {}  # forward tensor -> nodes to emit right after it
    for node in graph.node:
        source = node.input[0] if node.op_type == "Shape" and node.input else ""
        if (not is_backward(node) or not _whole_shape(node) or source not in producer
                or is_backward(producer[source]) or source in moved):
            continue
        forward_readers = [r for r in readers[source] if not is_backward(r)]
        if not forward_readers:
            continue
        pinned = source + SUFFIX
        for reader in forward_readers:
            reader.input[:] = [pinned if name == source else name for name in reader.input]
        moved[source] = [node, helper.make_node("Reshape", [source, node.output[0]], [pinned],
                                                name=f"{source}/shape_pin")]
    if moved:
        relocated = {id(n) for nodes in moved.values() for n in nodes[:1]}
        order = []
        for node in graph.node:
            if id(node) in relocated:
                continue
            order.append(node)
            for out in node.output:
                order += moved.get(out, [])
        graph.ClearField("node")
        graph.node.extend(order)
    return len(moved)


def _whole_shape(node: onnx.NodeProto) -> bool:
    """True if the Shape node returns every dimension (no `end`, `start` 0), so Reshape can take it."""
    attrs = {a.name: a.i for a in node.attribute}
    return attrs.get("start", 0) == 0 and "end" not in attrs
