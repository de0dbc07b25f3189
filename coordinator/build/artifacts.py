"""ONNX Runtime Training artifacts (training / eval / optimizer graphs + checkpoint)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from edgeftl.coordinator.build.attention_recompute import recompute_attention_probs
from edgeftl.coordinator.build.layernorm_grad import decompose_layernorm_grads
from edgeftl.coordinator.build.recompute import recompute_dequantized_weights
from edgeftl.device.manifest import CHECKPOINT, EVAL_MODEL, TRAINING_MODEL, TrainableParam
from edgeftl.device.ort import training_api


def generate(model: onnx.ModelProto, trainable: list[str], out: Path, recompute: bool = False,
             recompute_attention: bool = True) -> None:
    """Write the four artifacts into `out` (which must exist).

    Every initializer that is not trainable is listed as a frozen parameter, so it is stored
    once, in the checkpoint, at its own dtype (int8 / packed uint8 stay small), instead of as
    a constant in both the training and the eval graph. The task model already outputs
    (loss, logits); the loss block passes `loss` through and `logits` rides along as an extra
    output so devices can compute accuracy.

    The training graph is then rewritten: LayerNorm input gradients as plain ops
    (`layernorm_grad.py`, always), with `recompute` dequantized weights and with
    `recompute_attention` attention probabilities recomputed for the backward pass
    (`recompute.py`, `attention_recompute.py`).
    """
    from onnxruntime.training import artifacts

    names = [init.name for init in model.graph.initializer]
    missing = sorted(set(trainable) - set(names))
    if missing:
        raise RuntimeError(f"trainable parameters missing from the exported graph: {missing[:5]}")
    frozen = [name for name in names if name not in set(trainable)]
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    with native_stderr_captured():
        artifacts.generate_artifacts(
            model,
            requires_grad=list(trainable),
            frozen_params=frozen,
            loss=None,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=out,
            loss_input_names=["loss"],
            additional_output_names=["logits"],
        )
    path = out / TRAINING_MODEL
    training = onnx.load(str(path))
    if recompute:
        recompute_dequantized_weights(training, set(frozen))
    if recompute_attention:
        recompute_attention_probs(training)
    decompose_layernorm_grads(training)
    onnx.save(training, str(path))


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[None]:
    """Hold back native (C++) stderr; replay it only if the block fails.

    ORT's gradient-graph builder logs every graph transformer pass at INFO level through its
    own logger, which `set_default_logger_severity` does not reach: ~50 lines per build.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def contiguous_layout(out: Path) -> list[TrainableParam]:
    """Trainable parameters in the order of ORT's contiguous parameter buffer, with offsets.

    Found by writing 0..n-1 into the buffer and reading back where each parameter's first
    element landed, so it is the runtime's own order rather than an assumption about it.
    """
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(out / CHECKPOINT))
    module = api.Module(str(out / TRAINING_MODEL), state, str(out / EVAL_MODEL))
    size = module.get_parameters_size(trainable_only=True)
    buffer = module.get_contiguous_parameters(trainable_only=True)
    marker = np.arange(size, dtype=np.float32)
    buffer.numpy()[:] = marker  # OrtValue on CPU shares memory with this view
    module.copy_buffer_to_parameters(buffer, trainable_only=True)
    layout = []
    for name, param in state.parameters:
        if not param.requires_grad:
            continue
        data = param.data
        layout.append(TrainableParam(name, list(data.shape), str(data.dtype), int(data.reshape(-1)[0])))
    layout.sort(key=lambda p: p.offset)
    position = 0
    for param in layout:
        if param.offset != position:
            raise RuntimeError(f"unexpected ORT parameter layout at {param.name}: offset {param.offset} != {position}")
        position += param.size
    if position != size:
        raise RuntimeError(f"trainable sizes add up to {position}, ORT buffer holds {size}")
    return layout
