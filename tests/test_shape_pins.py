"""Backward Shape reads pinned to the forward pass (coordinator/bundler/shape_pins.py).

A Reshape's gradient needs its input's shape; the pass must move that Shape next to the input's
producer, make the forward readers wait for it, and change no number.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeftl.coordinator.bundler.shape_pins import SUFFIX, pin_shape_reads

from fixtures_build import bundle


def _graph() -> onnx.ModelProto:
    """x = Relu(a); y = Reshape(x, (-1, 2, 3)); backward: dx = Reshape(dy, Shape(x))."""
    nodes = [
        helper.make_node("Relu", ["a"], ["x"], name="/relu"),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="/reshape"),
        helper.make_node("Mul", ["y", "y"], ["dy"], name="/reshape_Grad/mul"),  # stands in for the incoming gradient
        helper.make_node("Shape", ["x"], ["x_shape"], name="/reshape_Grad/Shape_0", start=0),
        helper.make_node("Reshape", ["dy", "x_shape"], ["dx"], name="/reshape_Grad/Reshape_1"),
    ]
    graph = helper.make_graph(nodes, "pins", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "dx")],
                              initializer=[numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "target")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, a: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y", "dx"], {"a": a})


def test_the_shape_read_moves_next_to_its_producer_and_numbers_stay() -> None:
    # Prepare
    a = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    model, expected = _graph(), _run(_graph(), a)

    # Execute
    pinned = pin_shape_reads(model.graph)

    # Assert: Relu, then the Shape and the pin, then the forward Reshape reading the pinned x
    order = [n.name for n in model.graph.node]
    assert pinned == 1
    assert order[:3] == ["/relu", "/reshape_Grad/Shape_0", "x/shape_pin"]
    assert list(model.graph.node[3].input) == [f"x{SUFFIX}", "target"]
    seen = {"a", "target"}
    for node in model.graph.node:  # still topologically sorted
        assert all(name in seen for name in node.input), node.name
        seen.update(node.output)
    for got, want in zip(_run(model, a), expected):
        np.testing.assert_array_equal(got, want)


def test_built_bundles_leave_no_backward_shape_read_of_a_forward_tensor_unpinned(tmp_path_factory) -> None:
    # Prepare
    graph = onnx.load(str(bundle(tmp_path_factory, "bert-int8") / "training_model.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    # Execute: forward tensors whose shape the backward pass reads while forward nodes read them too
    late = [n.name for n in graph.node if n.op_type == "Shape" and "_Grad" in n.name and n.input[0] in producer
            and "_Grad" not in producer[n.input[0]].name
            and any("_Grad" not in r.name and not r.name.endswith("/shape_pin") for r in readers[n.input[0]])]

    # Assert
    assert not late, late
    assert any(n.name.endswith("/shape_pin") for n in graph.node)
