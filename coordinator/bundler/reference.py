"""The training build's own runtime for a bundle's ORT Training artifacts: the reference devices are checked against.

Runs only in a process whose `onnxruntime` is the training build (`training_build.py` starts
those). It trains the graphs ONNX Runtime Training generated (with its training-only ops,
gradient accumulators and AdamW optimizer graph) the way edgeftl devices did before they moved
to stock ONNX Runtime; the build's probe, the equivalence tests and `tools/bench_device.py`
compare the portable runtime with it.

    reference/training_model.onnx   ORT Training graph (after edgeftl's recompute rewrites)
    reference/eval_model.onnx
    reference/optimizer_model.onnx  one AdamWOptimizer node
    reference/checkpoint            every parameter, in ORT's checkpoint format
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT = (
    "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


def training_api() -> types.ModuleType:
    """`onnxruntime.training.api` without running `onnxruntime/training/__init__.py`.

    That `__init__` imports torch (through `optim`), which a measured process must not hold:
    a bare package object with the same `__path__` lets `api` load on its own (FACTS).
    """
    name = "onnxruntime.training"
    if f"{name}.api" in sys.modules:
        return sys.modules[f"{name}.api"]
    if name not in sys.modules:
        root = importlib.util.find_spec("onnxruntime")
        folder = Path(root.origin).parent / "training" if root and root.origin else None
        if folder is None or not (folder / "api" / "module.py").is_file():
            raise RuntimeError("this process's onnxruntime is not the training build; run it through "
                               "edgeftl.coordinator.bundler.training_build")
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
        sys.modules[f"{name}.ortmodule"] = None  # type: ignore[assignment]  # "no ORTModule"
    import onnxruntime  # noqa: F401

    return importlib.import_module(f"{name}.api")


class ReferenceRuntime:
    """Forward/backward, accumulation and AdamW steps with ONNX Runtime Training's Module and Optimizer."""

    def __init__(self, folder: Path, threads: int | None = None, shared_arena: bool = False) -> None:
        """Load the artifacts in `folder`; `shared_arena` as `device/ort.py` (what devices ran with)."""
        api = training_api()  # first: a plain `import onnxruntime` would import torch
        from edgeftl.device.ort import session_options  # the settings edgeftl devices trained with

        folder = Path(folder)
        self.state = api.CheckpointState.load_checkpoint(str(folder / CHECKPOINT))
        self.module = api.Module(str(folder / TRAINING_MODEL), self.state, str(folder / EVAL_MODEL),
                                 session_options=session_options(threads, training=True, shared_arena=shared_arena))
        self.optimizer = api.Optimizer(str(folder / OPTIMIZER_MODEL), self.module)
        self.trainable = [name for name, p in self.state.parameters if p.requires_grad]

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def accumulate(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray, weight: float = 1.0) -> float:
        """Forward + backward adding `weight` x this batch's gradient; returns the unweighted loss."""
        self.module.train()
        loss, _ = self.module(features, mask, targets, np.array(weight, dtype=np.float32))
        return float(loss) / weight if weight else 0.0

    def apply_step(self) -> None:
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def eval_step(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        self.module.eval()
        loss, logits = self.module(features, mask, targets, np.array(1.0, dtype=np.float32))
        return float(loss), logits

    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters by name (copies)."""
        return {name: np.array(self.state.parameters[name].data) for name in self.trainable}

    def gradients(self) -> dict[str, np.ndarray]:
        """Accumulated gradients by name (copies), before `apply_step` clears them."""
        return {name: np.array(self.state.parameters[name].grad) for name in self.trainable}
