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


def session_options(threads: int | None = None, training: bool = False, shared_arena: bool = False) -> Any:
    """SessionOptions with graph optimizations on (turning them off raised peak RSS ~20%).

    Training sessions get two memory settings, both measured on MiniLM, batch 16 x 128:

    - buffer reuse off (`enable_mem_reuse`). With reuse on, ORT's planner hands a freed
      buffer to the next tensor of the same size; in a training graph that tensor is often
      one kept for the backward pass, so short-lived buffers end up held until the backward
      pass reaches them. The forward pass then held ~70 MB per block where the backward needs
      ~42 MB (seen by tracing every allocation). Reuse off: int8 peak RSS 565 -> 408 MiB,
      fp32 620 -> 461, int4 588 -> 417, step time unchanged within noise (ORTModule turns
      reuse off for the same reason, onnxruntime PR 7359).
    - the memory-pattern planner off (`enable_mem_pattern`): it pre-plans one block per
      distinct input shape and, with the variable shapes of the backward pass, held more
      than it saved (int8 peak 632 -> 575 MiB before reuse was turned off).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if shared_arena:
        _register_shared_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
    if training:
        options.enable_mem_pattern = False
        options.enable_mem_reuse = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


_shared_arena_registered = False


def _register_shared_arena(ort: Any) -> None:
    """One CPU memory arena for every session that asks for it (`shared_arena=True`).

    Each ORT session otherwise grows its own arena to its own peak and keeps it: a training
    module's eval session run once at the end of training held another 69 MiB (MiniLM int8,
    eval batch 16 x 128; still 22 MiB at eval batch 1) next to the training session's arena,
    where in one shared arena it reuses the training step's freed blocks (peak 464 -> 406 MiB).
    Training alone peaked within +-12 MiB of separate arenas (bench_device's bundles, micro-batch
    16 and 4; ORT's arena defaults, which a 1 MiB max_dead_bytes_per_chunk did not beat overall).
    The arena belongs to ORT's process-wide environment, so it is registered once.
    """
    global _shared_arena_registered
    if _shared_arena_registered:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, None)  # None: ORT's default arena settings
    except RuntimeError as error:  # someone else in this process registered one: share theirs
        if "already been registered" not in str(error):
            raise
    _shared_arena_registered = True
