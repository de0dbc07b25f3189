"""Load ONNX Runtime's training API without importing torch.

`import onnxruntime.training.api` executes `onnxruntime/training/__init__.py`, which imports
torch through `onnxruntime.training.optim`: a device process then starts at ~342 MB RSS instead
of ~69 MB (measured, see shared FACTS). The `api` submodule itself needs only numpy and the
native extension, so we register a bare package object for `onnxruntime.training` (same
`__path__`, no `__init__` executed) and import `api` through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

_TRAINING = "onnxruntime.training"


def install_torch_free_import() -> None:
    """Make later `import onnxruntime` calls skip the torch import (idempotent).

    Called when `edgeftl.device` is imported, so any device module may import onnxruntime.
    Too late (a no-op) if onnxruntime was already imported by someone else.
    """
    if _TRAINING not in sys.modules and "onnxruntime" not in sys.modules:
        _register_bare_training_package()


def training_api() -> types.ModuleType:
    """Return `onnxruntime.training.api` (Module, Optimizer, CheckpointState), torch-free.

    Raises:
        RuntimeError: if the installed onnxruntime has no training support.
    """
    if f"{_TRAINING}.api" in sys.modules:
        return sys.modules[f"{_TRAINING}.api"]
    if _TRAINING not in sys.modules:
        _register_bare_training_package()
    import onnxruntime  # noqa: F401  (native extension + inference API)

    return importlib.import_module(f"{_TRAINING}.api")


def _register_bare_training_package() -> None:
    # Must run before the first `import onnxruntime`: its build-info check tries
    # `onnxruntime.training.ortmodule`, which imports torch when torch is installed.
    root = importlib.util.find_spec("onnxruntime")
    folder = Path(root.origin).parent / "training" if root and root.origin else None
    if folder is None or not (folder / "api" / "module.py").is_file():
        raise RuntimeError(
            "onnxruntime has no training support; install onnxruntime-training-cpu==1.19.2 "
            "(and not the plain onnxruntime package, which shadows it)"
        )
    package = types.ModuleType(_TRAINING)
    package.__path__ = [str(folder)]
    package.__package__ = _TRAINING
    sys.modules[_TRAINING] = package
    # A None entry makes `import onnxruntime.training.ortmodule` raise ImportError, which
    # onnxruntime's validation treats as "no ORTModule" (ORTModule is the torch frontend).
    sys.modules[f"{_TRAINING}.ortmodule"] = None  # type: ignore[assignment]


def session_options(threads: int | None = None, training: bool = False) -> Any:
    """SessionOptions with graph optimizations on (turning them off raised peak RSS ~20%).

    For training sessions the memory-pattern planner is off: it pre-plans one block per
    distinct input shape and, with the variable shapes of the backward pass, held more than it
    saved (MiniLM int8, batch 16 x 128: peak RSS 632 -> 575 MiB; fp32 679 -> 676 MiB).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if training:
        options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options
