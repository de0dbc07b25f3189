"""Coordinator-side evaluation of global parameters with the devices' torch-free runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeftl.device.data import read_examples
from edgeftl.device.runtime import BundleRuntime
from edgeftl.device.train import evaluate, text_inputs


def make_evaluator(bundle: Path, test_file: Path, batch: int = 32, threads: int | None = None,
                   cache_dir: Path | None = None) -> Callable[[np.ndarray], dict]:
    """A function global_params -> {"accuracy", "loss"} on a held-out file.

    For a split bundle with `cache_dir`, the frozen lower stack runs once per test example.
    """
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
        if "eval_accuracy" in result:
            out["accuracy"] = result["eval_accuracy"]
        return out

    return run
