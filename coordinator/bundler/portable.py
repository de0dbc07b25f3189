"""Rewrite an ORT Training graph into one that stock ONNX Runtime runs: standard ops, raw gradients out.

ONNX Runtime Training's gradient builder writes ops that only the training build registers.
Each is replaced by standard ONNX ops computing the same values (float rounding aside):

    ConcatTraining              Concat (+ the per-input lengths from Shape, when read)
    SplitTraining               Split
    SliceGrad                   Pad of the incoming gradient back to the sliced input's shape
    GeluGrad                    dY * (Phi(x) + x * phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2
    QuickGeluGrad               dY * s * (1 + a x (1 - s)), s = sigmoid(a x)
    SoftmaxGrad(_13)            Y * (dY - sum(dY * Y)) over the softmax axis
    LogSoftmaxGrad(_13)         dY - exp(Y) * sum(dY) over the axis
    SoftmaxCrossEntropyLossGrad (softmax - onehot(label)) * dY * valid / count, the onehot as a
                                ScatterElements add (no (N, classes) one-hot tensor)
    ReluGrad, SigmoidGrad,      dY * (Y > 0), dY * Y * (1 - Y), dY * (1 - Y * Y)
      TanhGrad
    Scale                       Mul (or Div with scale_down) by the scale cast to the input's type
    ReduceSumTraining           ReduceSum (axes as an input since opset 13, as here)
    GatherElementsGrad          ScatterElements add of dY into zeros of the gathered input's shape
    InPlaceAccumulatorV2        removed: the gradient itself becomes a graph output `<param>_grad`;
                                devices accumulate micro-batches and run AdamW in numpy

The training graph keeps every parameter (trainable and frozen) as a graph input, so one copy
of the frozen weights in the device process serves the training and the evaluation graph.
Its `logits` output is dropped: training reads only the loss, and an output must stay
allocated to the end of the run (a causal LM's logits are (batch, seq, vocabulary)); the
nodes that only computed it go too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeftl.device.protocol.manifest import GRAD_SUFFIX

MS = "com.microsoft"
# Non-standard ops that stock CPU builds of ONNX Runtime register (checked against the
# installed onnxruntime by tests/test_portable.py): what a portable graph may still hold.
STOCK_CONTRIB_OPS = frozenset({
    (MS, "FusedMatMul"), (MS, "Gelu"), (MS, "QuickGelu"), (MS, "BiasGelu"), (MS, "FastGelu"),
    (MS, "SkipLayerNormalization"), (MS, "SkipSimplifiedLayerNormalization"), (MS, "TransposeMatMul"),
    ("", "SimplifiedLayerNormalization"),
})
ACCUMULATOR_SUFFIX = "_grad.accumulation.buffer"
RESET_INPUT = "lazy_reset_grad"
TRAINING_OUTPUTS = ("loss",)


class PortabilityError(ValueError):
    """The graph holds something the rewrite cannot express in standard ops; names it."""


class _Emitter:
    """Appends new nodes and constant initializers with names unique to one rewritten node."""

    def __init__(self, graph: onnx.GraphProto, prefix: str, constants: dict) -> None:
        self.graph, self.prefix, self.nodes, self._count, self._constants = graph, prefix, [], 0, constants

    def const(self, value: float | list, dtype: type = np.float32) -> str:
        array = np.array(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"edgeftl_portable_const_{len(self._constants)}"
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def op(self, kind: str, inputs: list[str], output: str | None = None, domain: str = "", **attrs) -> str:
        self._count += 1
        output = output or f"{self.prefix}/{kind}_{self._count}"
        self.nodes.append(helper.make_node(kind, inputs, [output], name=f"{self.prefix}/{kind}_{self._count}",
                                           domain=domain, **attrs))
        return output


def make_portable(model: onnx.ModelProto) -> dict[str, str]:
    """Rewrite `model` (an ORT Training training graph) in place; return {parameter: gradient output}.

    Raises:
        PortabilityError: an op the rewrite does not cover, or one it cannot express.
    """
    accumulated = rewrite_training_ops(model.graph)
    gradients = _rewire_io(model.graph, accumulated)
    prune_dead_nodes(model.graph)
    _prune_opsets(model)
    check_portable(model)
    return gradients


def rewrite_training_ops(graph: onnx.GraphProto) -> dict[str, str]:
    """Replace every training-only node `REWRITES` covers (in place); drop gradient accumulators.

    Returns:
        {parameter: gradient tensor} read off the accumulators that were dropped.
    """
    values = _constant_values(graph)
    constants: dict = {}
    accumulated: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for index, node in enumerate(graph.node):
        if node.op_type == "InPlaceAccumulatorV2":
            buffer, value = node.input[0], node.input[1]
            if not buffer.endswith(ACCUMULATOR_SUFFIX):
                raise PortabilityError(f"gradient accumulator {node.name!r} reads {buffer!r}, not a "
                                       f"'<parameter>{ACCUMULATOR_SUFFIX}' buffer")
            accumulated[buffer[: -len(ACCUMULATOR_SUFFIX)]] = value
            continue
        rewrite = REWRITES.get((node.domain or "", node.op_type))
        if rewrite is None:
            new_nodes.append(node)
            continue
        emit = _Emitter(graph, f"{node.name or node.op_type}_{index}/portable", constants)
        rewrite(node, emit, values, read)
        new_nodes += emit.nodes
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return accumulated


def check_portable(model: onnx.ModelProto) -> None:
    """Raise PortabilityError naming every op a stock ONNX Runtime CPU build would not run."""
    left = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in model.graph.node if not _stock(n)})
    if left:
        raise PortabilityError(f"the training graph still holds ops only ONNX Runtime Training registers: "
                               f"{', '.join(left)}; edgeftl cannot make this model portable yet")


def _stock(node: onnx.NodeProto) -> bool:
    domain = node.domain or ""
    if (domain, node.op_type) in STOCK_CONTRIB_OPS:
        return True
    return domain in ("", "ai.onnx") and onnx.defs.has(node.op_type)


def _rewire_io(graph: onnx.GraphProto, gradients: dict[str, str]) -> dict[str, str]:
    """Drop accumulator inputs and outputs and `logits`; expose each gradient as output `<param>_grad`."""
    params = {i.name: i for i in graph.input}
    missing = sorted(p for p in gradients if p not in params)
    if missing:
        raise PortabilityError(f"gradients of {missing[:3]} have no matching parameter input")
    keep_inputs = [i for i in graph.input if not i.name.endswith(ACCUMULATOR_SUFFIX) and i.name != RESET_INPUT]
    graph.ClearField("input")
    graph.input.extend(keep_inputs)
    outputs = [o for o in graph.output if o.name in TRAINING_OUTPUTS]
    for param, grad in gradients.items():
        name = param + GRAD_SUFFIX  # the bundle's naming contract (device/protocol/manifest.py GRAD_SUFFIX)
        if grad != name:
            graph.node.append(helper.make_node("Identity", [grad], [name], name=f"{name}/output"))
        shape = [d.dim_value for d in params[param].type.tensor_type.shape.dim]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph.ClearField("output")
    graph.output.extend(outputs)
    produced = {out for node in graph.node for out in node.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for info in stale:
        graph.value_info.remove(info)
    return {param: param + GRAD_SUFFIX for param in gradients}


def prune_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes (in place) none of whose outputs reaches a graph output; returns how many.

    A causal LM's training graph computes the concatenated logits only for the dropped `logits`
    output: left in, that (batch, seq, vocabulary) tensor would be built every step.
    """
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):  # topological order: readers come after producers
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    removed = len(graph.node) - len(keep)
    if removed:
        graph.ClearField("node")
        graph.node.extend(reversed(keep))
        produced = {out for node in graph.node for out in node.output}
        for info in [v for v in graph.value_info if v.name not in produced]:
            graph.value_info.remove(info)
    return removed


def _prune_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in used or (o.domain or "") == ""]
    model.ClearField("opset_import")
    model.opset_import.extend(keep)


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant-node outputs, for attributes given as inputs."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


# ---- the rewrites: each emits nodes that produce `node`'s outputs under the same names ----------


def _concat(node, emit: _Emitter, values, read) -> None:
    axis = _attr(node, "axis")
    emit.op("Concat", list(node.input), node.output[0], axis=axis)
    if len(node.output) > 1 and node.output[1] and node.output[1] in read:
        # per-input lengths along the axis, (n_inputs,) int64, what SplitTraining splits by
        ends = {} if axis == -1 else {"end": axis + 1}
        lengths = [emit.op("Shape", [name], start=axis, **ends) for name in node.input]
        emit.op("Concat", lengths, node.output[1], axis=0)


def _split(node, emit: _Emitter, values, read) -> None:
    emit.nodes.append(helper.make_node("Split", list(node.input[:2]), list(node.output),
                                       name=f"{emit.prefix}/Split", axis=_attr(node, "axis", 0)))


def _slice_grad(node, emit: _Emitter, values, read) -> None:
    dy, shape, starts, ends, *rest = list(node.input) + [""] * (6 - len(node.input))
    axes, steps = rest[0], rest[1]
    if steps and not (steps in values and np.all(values[steps] == 1)):
        raise PortabilityError(f"{node.name!r}: SliceGrad with steps other than 1 is not supported")
    i64 = np.int64
    rank = emit.op("Shape", [shape])  # (1,): the sliced input's rank
    zero, two = emit.const([0], i64), emit.const([2], i64)
    if not axes:
        axes = emit.op("Range", [emit.const(0, i64), emit.op("Squeeze", [emit.op("Shape", [starts])]),
                                 emit.const(1, i64)])
    axes = emit.op("Where", [emit.op("Less", [axes, zero]), emit.op("Add", [axes, rank]), axes])
    dims = emit.op("Gather", [shape, axes], axis=0)

    def clamp(index: str) -> str:  # Slice's rule for step 1: negative counts from the end, then clip to [0, dim]
        wrapped = emit.op("Where", [emit.op("Less", [index, zero]), emit.op("Add", [index, dims]), index])
        return emit.op("Min", [emit.op("Max", [wrapped, zero]), dims])

    begin = clamp(starts)
    end = emit.op("Max", [clamp(ends), begin])
    pads = emit.op("ConstantOfShape", [emit.op("Mul", [rank, two])],
                   value=numpy_helper.from_array(np.array([0], dtype=i64)))
    pads = emit.op("ScatterElements", [pads, axes, begin], axis=0)
    pads = emit.op("ScatterElements", [pads, emit.op("Add", [axes, rank]), emit.op("Sub", [dims, end])], axis=0)
    emit.op("Pad", [dy, pads], node.output[0])


def _gelu_grad(node, emit: _Emitter, values, read) -> None:
    """dX = dY * (Phi(x) + x phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2, phi(x) = exp(-x^2 / 2) / sqrt(2 pi).

    Every node makes a new buffer (training sessions run with buffer reuse off), so this holds
    one full-size temporary more than the fused kernel at its peak (measured with exact
    accounting on MiniLM int8, 16 x 128: 13 MB). Of the orderings tried (this one, the same in
    z = x / sqrt 2 so x dies first, the derivative computed in the forward pass), this gave
    the lowest peak RSS.
    """
    dy, x = node.input[:2]
    cdf = emit.op("Erf", [emit.op("Mul", [x, emit.const(1 / np.sqrt(2))])])
    cdf = emit.op("Add", [emit.op("Mul", [cdf, emit.const(0.5)]), emit.const(0.5)])  # Phi(x)
    pdf = emit.op("Exp", [emit.op("Mul", [emit.op("Mul", [x, x]), emit.const(-0.5)])])
    pdf = emit.op("Mul", [emit.op("Mul", [x, pdf]), emit.const(1 / np.sqrt(2 * np.pi))])  # x * phi(x)
    emit.op("Mul", [dy, emit.op("Add", [cdf, pdf])], node.output[0])


def _quick_gelu_grad(node, emit: _Emitter, values, read) -> None:
    dy, x = node.input[:2]
    alpha = float(_attr(node, "alpha", 1.702))
    ax = x if alpha == 1.0 else emit.op("Mul", [x, emit.const(alpha)])
    s = emit.op("Sigmoid", [ax])
    inner = emit.op("Add", [emit.op("Mul", [ax, emit.op("Sub", [emit.const(1.0), s])]), emit.const(1.0)])
    emit.op("Mul", [dy, emit.op("Mul", [s, inner])], node.output[0])


def _softmax_grad(node, emit: _Emitter, values, read) -> None:
    dy, y = node.input[:2]
    axis = _attr(node, "axis", -1)
    if node.op_type == "SoftmaxGrad" and axis != -1:
        raise PortabilityError(f"{node.name!r}: SoftmaxGrad (opset < 13) over axis {axis} is not supported")
    total = emit.op("ReduceSum", [emit.op("Mul", [dy, y]), emit.const([axis], np.int64)], keepdims=1)
    emit.op("Mul", [y, emit.op("Sub", [dy, total])], node.output[0])


def _cross_entropy_grad(node, emit: _Emitter, values, read) -> None:
    dy, log_prob, label = node.input[:3]
    reduction = _attr(node, "reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if (len(node.input) > 3 and any(node.input[3:])) or reduction not in ("mean", "sum", "none"):
        raise PortabilityError(f"{node.name!r}: SoftmaxCrossEntropyLossGrad with class weights or reduction "
                               f"{reduction!r} is not supported")
    ignore = _attr(node, "ignore_index")
    one_axis = emit.const([1], np.int64)
    # keep: the labels that count; ignored ones point at class 0 with a zero scale.
    if ignore is None:
        keep, safe_label = emit.op("Equal", [label, label]), label
    else:
        keep = emit.op("Not", [emit.op("Equal", [label, emit.const(int(ignore), np.int64)])])
        safe_label = emit.op("Where", [keep, label, emit.const(0, np.int64)])
    valid = emit.op("Cast", [keep], to=TensorProto.FLOAT)
    scale = emit.op("Mul", [dy, valid])  # (N, ...): dY per label (reduction none) or broadcast
    if reduction == "mean":
        count = emit.op("Max", [emit.op("ReduceSum", [valid], keepdims=0), emit.const(1.0)])
        scale = emit.op("Div", [scale, count])
    scale = emit.op("Unsqueeze", [scale, one_axis])  # (N, 1, ...): broadcasts over classes
    grad = emit.op("Mul", [emit.op("Exp", [log_prob]), scale])
    emit.op("ScatterElements", [grad, emit.op("Unsqueeze", [safe_label, one_axis]), emit.op("Neg", [scale])],
            node.output[0], axis=1, reduction="add")


def _log_softmax_grad(node, emit: _Emitter, values, read) -> None:
    dy, y = node.input[:2]
    axis = _attr(node, "axis", -1)
    if node.op_type == "LogSoftmaxGrad" and axis != -1:
        raise PortabilityError(f"{node.name!r}: LogSoftmaxGrad (opset < 13) over axis {axis} is not supported")
    total = emit.op("ReduceSum", [dy, emit.const([axis], np.int64)], keepdims=1)
    emit.op("Sub", [dy, emit.op("Mul", [emit.op("Exp", [y]), total])], node.output[0])


def _relu_grad(node, emit: _Emitter, values, read) -> None:
    dy, y = node.input[:2]
    emit.op("Where", [emit.op("Greater", [y, emit.op("CastLike", [emit.const(0.0), y])]), dy,
                      emit.op("CastLike", [emit.const(0.0), dy])], node.output[0])


def _sigmoid_grad(node, emit: _Emitter, values, read) -> None:
    dy, y = node.input[:2]
    emit.op("Mul", [emit.op("Mul", [dy, y]), emit.op("Sub", [emit.const(1.0), y])], node.output[0])


def _tanh_grad(node, emit: _Emitter, values, read) -> None:
    dy, y = node.input[:2]
    emit.op("Mul", [dy, emit.op("Sub", [emit.const(1.0), emit.op("Mul", [y, y])])], node.output[0])


def _scale(node, emit: _Emitter, values, read) -> None:
    x, scale = node.input[:2]
    emit.op("Div" if _attr(node, "scale_down", 0) else "Mul", [x, emit.op("CastLike", [scale, x])], node.output[0])


def _reduce_sum(node, emit: _Emitter, values, read) -> None:
    emit.op("ReduceSum", list(node.input[:2]), node.output[0], keepdims=_attr(node, "keepdims", 1),
            noop_with_empty_axes=_attr(node, "noop_with_empty_axes", 0))


Rewrite = Callable[[onnx.NodeProto, _Emitter, dict, set], None]
def _gather_elements_grad(node, emit: _Emitter, values, read) -> None:
    dy, shape, indices = node.input[:3]
    zeros = emit.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.array([0.0], dtype=np.float32)))
    emit.op("ScatterElements", [zeros, indices, dy], node.output[0], axis=_attr(node, "axis", 0), reduction="add")


REWRITES: dict[tuple[str, str], Rewrite] = {
    (MS, "ConcatTraining"): _concat,
    (MS, "SplitTraining"): _split,
    (MS, "SliceGrad"): _slice_grad,
    (MS, "GeluGrad"): _gelu_grad,
    (MS, "QuickGeluGrad"): _quick_gelu_grad,
    (MS, "SoftmaxGrad_13"): _softmax_grad,
    (MS, "SoftmaxGrad"): _softmax_grad,
    (MS, "SoftmaxCrossEntropyLossGrad"): _cross_entropy_grad,
    (MS, "LogSoftmaxGrad_13"): _log_softmax_grad,
    (MS, "LogSoftmaxGrad"): _log_softmax_grad,
    (MS, "ReluGrad"): _relu_grad,
    (MS, "SigmoidGrad"): _sigmoid_grad,
    (MS, "TanhGrad"): _tanh_grad,
    (MS, "Scale"): _scale,
    (MS, "ReduceSumTraining"): _reduce_sum,
    (MS, "GatherElementsGrad"): _gather_elements_grad,
}
