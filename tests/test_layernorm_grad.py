"""LayerNorm / RMSNorm input gradients written as plain ops (coordinator/bundler/layernorm_grad.py).

The reference is ORT's own fused LayerNormalizationGrad kernel, run on the same inputs by the
training build (which alone registers it); the decomposition runs on stock onnxruntime. A built
bundle must contain no fused node and still train (its loss falls).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeftl.coordinator.bundler.layernorm_grad import decompose_layernorm_grads
from edgeftl.coordinator.bundler.training_build import infer
from edgeftl.device.ort import session_options
from edgeftl.device.runtime import BundleRuntime

from fixtures_build import bundle

SHAPE = (3, 7, 16)  # (batch, seq, hidden)


def _grad_graph(opset: int, rms: bool = False, scale_grad_output: bool = False) -> onnx.ModelProto:
    """LayerNorm (or RMSNorm) forward + ORT's fused gradient; outputs dx (and dscale if asked)."""
    floats = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    if rms:  # ORT's RMSNorm ops: forward in the ONNX domain, gradient in com.microsoft
        nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y", "inv_std"],
                                  axis=-1, epsilon=1e-6, stash_type=1),
                 helper.make_node("SimplifiedLayerNormalizationGrad", ["dy", "x", "scale", "inv_std"],
                                  ["dx", "dscale"], domain="com.microsoft", axis=-1)]
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv_std"],
                                  axis=-1, epsilon=1e-12, stash_type=1),
                 helper.make_node("LayerNormalizationGrad", ["dy", "x", "scale", "mean", "inv_std"],
                                  ["dx", "dscale", "dbias"], domain="com.microsoft", axis=-1)]
    outputs = [floats("dx", list(SHAPE))] + ([floats("dscale", [SHAPE[-1]])] if scale_grad_output else [])
    inputs = [floats("x", list(SHAPE)), floats("dy", list(SHAPE)), floats("scale", [SHAPE[-1]])]
    inputs += [] if rms else [floats("bias", [SHAPE[-1]])]
    graph = helper.make_graph(nodes, "norm_grad", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    return session.run(["dx"], feeds)[0]


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute up to 17, an input from 18
def test_decomposed_input_gradient_matches_the_fused_kernel(opset: int, rms: bool) -> None:
    # Prepare: LayerNorm inputs with a large mean and spread, as residual streams have
    rng = np.random.default_rng(0)
    feeds = {"x": (rng.standard_normal(SHAPE) * 3 + 5).astype(np.float32),
             "dy": rng.standard_normal(SHAPE).astype(np.float32),
             "scale": rng.uniform(0.5, 1.5, SHAPE[-1]).astype(np.float32)}
    if not rms:
        feeds["bias"] = rng.standard_normal(SHAPE[-1]).astype(np.float32)
    fused = _grad_graph(opset, rms)
    decomposed = _grad_graph(opset, rms)

    # Execute
    replaced = decompose_layernorm_grads(decomposed)

    # Assert
    assert replaced == 1
    assert not [n for n in decomposed.graph.node if n.op_type.endswith("LayerNormalizationGrad")]
    expected, actual = infer(fused, feeds)["dx"], _run(decomposed, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 0.1  # a real gradient, not zeros on both sides


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_a_node_whose_scale_gradient_is_read_stays_fused(rms: bool) -> None:
    # Prepare: a trainable norm (its scale gradient is a graph output)
    model = _grad_graph(17, rms, scale_grad_output=True)

    # Execute
    replaced = decompose_layernorm_grads(model)

    # Assert
    assert replaced == 0
    assert len([n for n in model.graph.node if n.op_type.endswith("LayerNormalizationGrad")]) == 1


def test_built_bundles_hold_no_fused_layernorm_gradient_and_still_learn(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "bert-int8")
    ops = [n.op_type for n in onnx.load(str(folder / "training_model.onnx")).graph.node]
    runtime = BundleRuntime(folder, threads=1)
    runtime.set_learning_rate(0.05)
    ids, mask = runtime.encode(["team game season player", "vote election minister court",
                                "film music album", "bank shares market"])
    targets = runtime.targets(ids, mask, ["pos", "neg", "pos", "neg"])

    # Execute
    losses = [runtime.train_step(runtime.features(ids, mask), mask, targets) for _ in range(15)]

    # Assert
    assert "LayerNormalizationGrad" not in ops and ops.count("ReduceMean") >= 2 * 4  # 2 blocks x 2 LayerNorms
    assert losses[-1] < 0.5 * losses[0]


def test_llama_bundles_hold_no_fused_rmsnorm_gradient(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "llama-int8")

    # Execute
    ops = [n.op_type for n in onnx.load(str(folder / "training_model.onnx")).graph.node]

    # Assert: 2 blocks x 2 RMSNorms + the final norm, 4 of them on the gradient path
    assert "SimplifiedLayerNormalizationGrad" not in ops and ops.count("ReduceMean") >= 4
