"""ONNX Runtime session settings for the device: threads, memory planning, one shared arena.

Devices use the stock `onnxruntime` package (any build, any platform with a wheel). Nothing here
needs the discontinued training build: bundles hold only ops stock builds register, and the
optimizer runs in numpy (`device/optim.py`).
"""

from __future__ import annotations

from typing import Any


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
# kSameAsRequested = 1; bytes a free chunk may waste before the arena splits it.
ARENA = {"arena_extend_strategy": 1, "max_dead_bytes_per_chunk": 1 << 20}


def _register_shared_arena(ort: Any) -> None:
    """One CPU memory arena for every session that asks for it (`shared_arena=True`).

    Each ORT session otherwise grows its own arena to its own peak and keeps it: a training
    module's eval session run once at the end of training held another 69 MiB (MiniLM int8,
    eval batch 16 x 128; still 22 MiB at eval batch 1) next to the training session's arena,
    where in one shared arena it reuses the training step's freed blocks (peak 464 -> 406 MiB).
    Training alone peaked within +-12 MiB of separate arenas (bench_device's bundles, micro-batch
    16 and 4). The arena belongs to ORT's process-wide environment, so it is registered once.

    Its settings (`ARENA`): regions grown by what is asked (not to the next power of two), and a
    free chunk split whenever it would leave over 1 MiB unused. The portable training graphs
    spell some fused gradient kernels as several elementwise nodes whose short-lived buffers
    fragment ORT's default arena: at 16 x 128 on stock onnxruntime 1.32 these settings lowered
    the peak of the top-2 split int8 bundle 228 -> 218 MiB and of fp32 413 -> 402, int8 358 -> 356,
    int4 352 -> 357 MiB, with the same step time (the training build, on its fused kernels, peaked
    at the same 207 MiB either way).
    """
    global _shared_arena_registered
    if _shared_arena_registered:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(ARENA) if ARENA else None)  # {}: ORT's defaults
    except RuntimeError as error:  # someone else in this process registered one: share theirs
        if "already been registered" not in str(error):
            raise
    _shared_arena_registered = True
