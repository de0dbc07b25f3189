"""Training artifacts: ORT Training's gradient graphs, rewritten into a bundle stock ONNX Runtime trains.

1. ONNX Runtime Training generates the training, eval and AdamW graphs and a checkpoint (in a
   training-build process, `training_build.py`), into a reference folder.
2. edgeftl's memory rewrites go into its training graph: LayerNorm input gradients as plain ops
   (`layernorm_grad.py`, always), a causal LM's logits per vocabulary block
   (`logits_recompute.py`), dequantized weights (`recompute.py`, quantized bundles) and
   attention probabilities (`attention_recompute.py`) recomputed for the backward pass. The
   reference folder then holds what bundles trained on before they became portable.
3. `portable.py` turns a copy into the bundle's training graph (standard ops, raw gradients
   out), and `shape_pins.py` ties the backward pass's shape reads to the forward so stock
   ONNX Runtime frees forward activations as early as the training build did. The eval graph
   is standard already. Every parameter goes into params.safetensors, and the AdamW settings
   are read off the optimizer graph's node.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeftl.coordinator.bundler.attention_recompute import recompute_attention_probs
from edgeftl.coordinator.bundler.config import BuildError
from edgeftl.coordinator.bundler.layernorm_grad import decompose_layernorm_grads
from edgeftl.coordinator.bundler.logits_recompute import recompute_logit_blocks
from edgeftl.coordinator.bundler.portable import PortabilityError, make_portable
from edgeftl.coordinator.bundler.recompute import recompute_dequantized_weights
from edgeftl.coordinator.bundler.reference import EVAL_MODEL as REF_EVAL
from edgeftl.coordinator.bundler.reference import OPTIMIZER_MODEL
from edgeftl.coordinator.bundler.reference import TRAINING_MODEL as REF_TRAINING
from edgeftl.coordinator.bundler.shape_pins import pin_shape_reads
from edgeftl.coordinator.bundler.training_build import run_job
from edgeftl.device.params import write_params
from edgeftl.device.protocol.manifest import EVAL_MODEL, PARAMS, TRAINING_MODEL, AdamWConfig, TrainableParam


@dataclass
class Artifacts:
    """What the manifest needs to know about the generated graphs."""

    trainable: list[TrainableParam]
    optimizer: AdamWConfig


def generate(model: onnx.ModelProto, trainable: list[str], out: Path, reference: Path, recompute: bool = False,
             recompute_attention: bool = True) -> Artifacts:
    """Write the bundle's training graph, eval graph and parameters into `out`, the ORT Training ones into `reference`.

    Args:
        model: the exported task model (outputs loss and logits); every initializer is a parameter.
        trainable: names of its trainable initializers, in the order of the flat trainable vector.
        out: the bundle's staging folder (exists).
        reference: an empty folder for the ORT Training artifacts (the build's probe and the
            equivalence tests train them with the training build).
    """
    names = [init.name for init in model.graph.initializer]
    missing = sorted(set(trainable) - set(names))
    if missing:
        raise BuildError(f"trainable parameters missing from the exported graph: {missing[:5]}")
    reference.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(reference / "task_model.onnx"))
    (reference / "trainable.json").write_text(json.dumps(trainable), encoding="utf-8")
    run_job("artifacts", reference / "task_model.onnx", reference / "trainable.json", reference)
    (reference / "task_model.onnx").unlink()

    training = onnx.load(str(reference / REF_TRAINING))
    frozen = set(names) - set(trainable)
    recompute_logit_blocks(training)  # before the weights' pass: its copies get recomputed weights too
    if recompute:
        recompute_dequantized_weights(training, frozen)
    if recompute_attention:
        recompute_attention_probs(training)
    decompose_layernorm_grads(training)
    onnx.save(training, str(reference / REF_TRAINING))

    try:
        make_portable(training)
    except PortabilityError as exc:
        raise BuildError(str(exc)) from exc
    pin_shape_reads(training.graph)
    onnx.save(training, str(out / TRAINING_MODEL))
    shutil.copyfile(reference / REF_EVAL, out / EVAL_MODEL)  # standard ops already
    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    write_params(out / PARAMS, tensors)
    return Artifacts(layout(tensors, trainable), read_optimizer(reference / OPTIMIZER_MODEL))


def layout(tensors: dict, trainable: list[str]) -> list[TrainableParam]:
    """Trainable parameters back to back in the flat vector, in the given order."""
    params, offset = [], 0
    for name in trainable:
        array = tensors[name]
        if str(array.dtype) != "float32":
            raise BuildError(f"trainable parameter {name!r} is {array.dtype}; trainable parameters must be float32")
        params.append(TrainableParam(name, list(array.shape), "float32", offset))
        offset += array.size
    return params


def read_optimizer(path: Path) -> AdamWConfig:
    """AdamW settings from ORT Training's optimizer graph (one com.microsoft AdamWOptimizer node)."""
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise BuildError(f"{path.name} holds {len(nodes)} AdamWOptimizer nodes, expected 1")
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}

    def f32(name: str, default: float) -> float:  # the shortest decimal of the float32 attribute: 0.9, not 0.8999999762
        return float(np.format_float_positional(np.float32(attrs.get(name, default)), unique=True))

    # The kernel's defaults for attributes the node leaves out (adamw.h / AdamWOptimizerBase).
    return AdamWConfig(beta1=f32("alpha", 0.9), beta2=f32("beta", 0.999), eps=f32("epsilon", 1e-8),
                       weight_decay=f32("weight_decay", 0.0), bias_correction=bool(attrs.get("correct_bias", 1)),
                       mode=int(attrs.get("adam_mode", 0)))
