"""Coordinator-side evaluation of global parameters with the devices' torch-free runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeftl.device.data import check_task, read_examples
from edgeftl.device.protocol.manifest import read_manifest
from edgeftl.device.runtime import BundleRuntime
from edgeftl.device.train import evaluate, text_inputs


def make_evaluator(bundle: Path, test_file: Path, batch: int = 32, threads: int | None = None,
                   cache_dir: Path | None = None) -> Callable[[np.ndarray], dict]:
    """A function global_params -> {"loss", and "accuracy" (classify) or "perplexity" (causal-lm)} on a
    held-out file: the keys of records.MEASURES.

    For a split bundle with `cache_dir`, the frozen lower stack runs once per test example.

    Raises:
        DataError: the file does not suit the bundle's task or labels (one line, before any work).
    """
    manifest = read_manifest(bundle)
    check_task(test_file, manifest.task, manifest.labels)
    runtime = BundleRuntime(bundle, threads=threads, train=False)
    examples = read_examples(test_file, runtime.manifest.task, runtime.manifest.labels or None)
    if runtime.lower is not None and cache_dir is not None:
        from edgeftl.device.cache import open_or_build

        inputs = open_or_build(runtime, examples, test_file, cache_dir, progress=False).inputs(runtime, examples)
    else:
        inputs = text_inputs(runtime, examples)

    def run(params: np.ndarray) -> dict:
        runtime.set_flat(params)
        result = evaluate(runtime, examples, batch, inputs)
        out = {"loss": result["eval_loss"]}
        for measure in ("accuracy", "perplexity"):
            if f"eval_{measure}" in result:
                out[measure] = result[f"eval_{measure}"]
        return out

    return run
