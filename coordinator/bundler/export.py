"""torch -> ONNX export of the task models, plus the graph fixes ORT's gradient builder needs."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 17  # ORT 1.19.2's training graph builder is exercised at 17; opset 18 adds nothing we need.


def export_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
) -> onnx.ModelProto:
    """TorchScript export with constant folding off, returning the fixed-up ModelProto.

    Constant folding stays off so that frozen weights (fp32 or int8/uint8 behind their
    dequantization ops) stay named initializers instead of being folded into new fp32 ones.
    """
    module.eval()
    # Only the top-level flag: torch's exporter merges initializers of equal *value* unless the
    # root module is in training mode, and merged tensors (e.g. zero-initialised LoRA B
    # matrices) make ORT's gradient graph fail with "Duplicate definition of ..._grad".
    # Submodules stay in eval mode, so dropout is off.
    module.training = True
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(path),
                input_names=list(inputs),
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=False,
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
            )
    finally:
        module.training = False
    model = onnx.load(str(path))
    add_layernorm_stat_outputs(model)
    return model


def add_layernorm_stat_outputs(model: onnx.ModelProto) -> int:
    """Declare LayerNormalization's optional Mean and InvStdDev outputs (in place).

    ORT's LayerNormalization gradient reads them; without them the gradient builder fails with
    `GradientBuilderBase::O ... i < node_->OutputDefs().size() was false`. Returns nodes changed.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}_mean", f"{node.output[0]}_inv_std_dev"])
            changed += 1
    return changed


def initializer_names(model: onnx.ModelProto) -> list[str]:
    return [init.name for init in model.graph.initializer]
