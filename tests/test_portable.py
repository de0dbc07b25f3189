"""Training-only ops rewritten into standard ones (coordinator/bundler/portable.py), op by op.

Each case is a one-node graph holding an op only ONNX Runtime Training registers. The
reference output comes from the training build itself (run in its own process through
`training_build.infer`); the rewritten graph runs on the stock onnxruntime installed here.
Inputs are random with a fixed seed and shaped like the graphs edgeftl builds (batch, seq,
hidden); `SliceGrad` cases cover negative starts, open ends and several axes.

Tolerance: the rewrites change the order of float32 operations only, so outputs agree to a few
float32 ulps of the largest value: rtol 1e-5 and atol 1e-6 (observed: <= 3e-7).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeftl.coordinator.bundler.portable import (
    REWRITES,
    STOCK_CONTRIB_OPS,
    PortabilityError,
    check_portable,
    rewrite_training_ops,
)
from edgeftl.coordinator.bundler.training_build import infer

MS = "com.microsoft"
RNG = np.random.default_rng(0)
INT64_MAX = np.iinfo(np.int64).max


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _model(op: str, feeds: dict[str, np.ndarray], outputs: list[str], constants: dict | None = None,
           **attrs) -> onnx.ModelProto:
    """One `op` node (com.microsoft) reading feeds then constants (initializers), writing outputs."""
    constants = constants or {}
    node = helper.make_node(op, [*feeds, *constants], outputs, name=f"{op}_Grad/node", domain=MS, **attrs)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for name, a in feeds.items()]
    graph = helper.make_graph([node], op, inputs, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              initializer=[numpy_helper.from_array(a, n) for n, a in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                             ir_version=8)


def _stock(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _labels(n: int, classes: int, ignored: int) -> np.ndarray:
    labels = RNG.integers(0, classes, n).astype(np.int64)
    labels[RNG.choice(n, ignored, replace=False)] = -100
    return labels


SCE = {"reduction": "mean", "ignore_index": -100}
CASES = [
    pytest.param("GeluGrad", {"dY": _f(2, 5, 16), "X": _f(2, 5, 16) * 3}, ["dX"], None, {}, id="GeluGrad"),
    pytest.param("QuickGeluGrad", {"dY": _f(2, 5, 16), "X": _f(2, 5, 16) * 3}, ["dX"], None, {"alpha": 1.0},
                 id="QuickGeluGrad-silu"),
    pytest.param("QuickGeluGrad", {"dY": _f(2, 5, 16), "X": _f(2, 5, 16) * 3}, ["dX"], None, {"alpha": 1.702},
                 id="QuickGeluGrad-1.702"),
    pytest.param("SoftmaxGrad_13", {"dY": _f(2, 4, 6, 6), "Y": _softmax(_f(2, 4, 6, 6) * 2)}, ["dX"], None,
                 {"axis": -1}, id="SoftmaxGrad_13"),
    pytest.param("LogSoftmaxGrad_13", {"dY": _f(3, 7), "Y": np.log(_softmax(_f(3, 7)))}, ["dX"], None,
                 {"axis": -1}, id="LogSoftmaxGrad_13"),
    pytest.param("SoftmaxCrossEntropyLossGrad",
                 {"dY": np.array(0.7, np.float32), "log_prob": np.log(_softmax(_f(9, 5))), "label": _labels(9, 5, 3)},
                 ["dX"], None, SCE, id="SCEGrad-mean-ignore"),
    pytest.param("SoftmaxCrossEntropyLossGrad",
                 {"dY": np.array(1.3, np.float32), "log_prob": np.log(_softmax(_f(6, 4))), "label": _labels(6, 4, 0)},
                 ["dX"], None, {"reduction": "sum"}, id="SCEGrad-sum"),
    pytest.param("SoftmaxCrossEntropyLossGrad",
                 {"dY": np.array(1.0, np.float32), "log_prob": np.log(_softmax(_f(3, 5, 4), axis=1)),
                  "label": _labels(12, 5, 2).reshape(3, 4)}, ["dX"], None, SCE, id="SCEGrad-3d"),
    pytest.param("SliceGrad", {"dY": _f(2, 3, 4)}, ["dX"],
                 {"shape": _i64(2, 3, 8), "starts": _i64(4), "ends": _i64(INT64_MAX), "axes": _i64(-1),
                  "steps": _i64(1)}, {}, id="SliceGrad-open-end"),
    pytest.param("SliceGrad", {"dY": _f(2, 2, 4)}, ["dX"],
                 {"shape": _i64(2, 3, 8), "starts": _i64(-3, 0), "ends": _i64(-1, 4), "axes": _i64(1, 2),
                  "steps": _i64(1, 1)}, {}, id="SliceGrad-negative-two-axes"),
    pytest.param("SliceGrad", {"dY": _f(2, 3, 4)}, ["dX"],
                 {"shape": _i64(2, 3, 8), "starts": _i64(0), "ends": _i64(4), "axes": _i64(2)}, {},
                 id="SliceGrad-no-steps"),
    pytest.param("ReluGrad", {"dY": _f(4, 6), "Y": np.maximum(_f(4, 6), 0)}, ["dX"], None, {}, id="ReluGrad"),
    pytest.param("SigmoidGrad", {"dY": _f(4, 6), "Y": 1 / (1 + np.exp(-_f(4, 6)))}, ["dX"], None, {},
                 id="SigmoidGrad"),
    pytest.param("TanhGrad", {"dY": _f(4, 6), "Y": np.tanh(_f(4, 6))}, ["dX"], None, {}, id="TanhGrad"),
    pytest.param("Scale", {"X": _f(3, 5)}, ["Y"], {"scale": np.array(4, np.int64)}, {"scale_down": 1},
                 id="Scale-down-int64"),
    pytest.param("Scale", {"X": _f(3, 5)}, ["Y"], {"scale": np.array(0.25, np.float32)}, {}, id="Scale-float"),
    pytest.param("ReduceSumTraining", {"X": _f(3, 5, 2)}, ["Y"], {"axes": _i64(1)}, {"keepdims": 0},
                 id="ReduceSumTraining"),
    # a causal LM's chunked loss gathers each position's target logit (repeated indices add up)
    pytest.param("GatherElementsGrad", {"dY": _f(2, 5, 2)}, ["dX"],
                 {"shape": _i64(2, 5, 7), "indices": RNG.integers(0, 3, (2, 5, 2)).astype(np.int64)}, {"axis": -1},
                 id="GatherElementsGrad-last-axis"),
    pytest.param("GatherElementsGrad", {"dY": _f(3, 4)}, ["dX"],
                 {"shape": _i64(6, 4), "indices": RNG.integers(0, 6, (3, 4)).astype(np.int64)}, {"axis": 0},
                 id="GatherElementsGrad-axis-0"),
]


@pytest.mark.parametrize(("op", "feeds", "outputs", "constants", "attrs"), CASES)
def test_rewritten_op_matches_the_training_build(op: str, feeds: dict, outputs: list[str], constants: dict | None,
                                                 attrs: dict) -> None:
    # Prepare
    model = _model(op, feeds, outputs, constants, **attrs)
    rewritten = _model(op, feeds, outputs, constants, **attrs)

    # Execute
    rewrite_training_ops(rewritten.graph)
    expected, actual = infer(model, feeds), _stock(rewritten, feeds)

    # Assert
    assert (MS, op) in REWRITES and not [n for n in rewritten.graph.node if n.op_type == op]
    check_portable(rewritten)
    for name in outputs:
        assert actual[name].shape == expected[name].shape
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(np.abs(v).max() > 0.01 for v in expected.values())  # a real output, not zeros on both sides


def test_concat_lengths_feed_the_split_that_undoes_it() -> None:
    # Prepare: the pair the gradient builder writes for a Concat on the last axis (rotary embeddings)
    a, b = _f(2, 3, 4), _f(2, 3, 6)
    nodes = [helper.make_node("ConcatTraining", ["a", "b"], ["cat", "lengths"], name="ConcatTraining", domain=MS,
                              axis=-1),
             helper.make_node("Neg", ["cat"], ["dcat"], name="Neg_Grad/neg"),
             helper.make_node("SplitTraining", ["dcat", "lengths"], ["da", "db"], name="Split_Grad/split",
                              domain=MS, axis=-1)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, x.shape) for n, x in (("a", a), ("b", b))]
    outputs = [helper.make_empty_tensor_value_info(n) for n in ("cat", "lengths", "da", "db")]
    graph = helper.make_graph(nodes, "concat_split", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                              ir_version=8)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)

    # Execute
    rewrite_training_ops(rewritten.graph)
    expected, actual = infer(model, {"a": a, "b": b}), _stock(rewritten, {"a": a, "b": b})

    # Assert
    check_portable(rewritten)
    for name in ("cat", "lengths", "da", "db"):
        np.testing.assert_array_equal(actual[name], expected[name])
    np.testing.assert_array_equal(actual["lengths"], [4, 6])


def test_an_op_without_a_rewrite_is_named_in_one_line() -> None:
    # Prepare: GatherGrad (a trainable embedding table) is not covered
    model = _model("GatherGrad", {"shape": _i64(5, 3), "indices": _i64(1, 3), "dY": _f(2, 3)}, ["dX"])

    # Execute
    rewrite_training_ops(model.graph)
    with pytest.raises(PortabilityError) as caught:
        check_portable(model)

    # Assert
    message = str(caught.value)
    assert "com.microsoft:GatherGrad" in message and "\n" not in message


def test_every_allowed_contrib_op_has_a_kernel_in_this_stock_onnxruntime() -> None:
    # Prepare: the CPU kernels the installed (stock) onnxruntime registers
    from importlib import metadata

    from onnxruntime.capi import onnxruntime_pybind11_state as native

    kernels = {(d.domain, d.op_name) for d in native.get_all_opkernel_def() if d.provider == "CPUExecutionProvider"}

    # Execute
    missing = sorted(op for op in STOCK_CONTRIB_OPS if op not in kernels)

    # Assert
    assert metadata.version("onnxruntime")  # the stock distribution, not the training build
    assert not missing, f"onnxruntime {ort.__version__} has no CPU kernel for {missing}"
    assert not set(REWRITES) & kernels  # what the rewrites replace really is training-only
