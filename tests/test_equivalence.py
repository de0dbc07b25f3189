"""The portable runtime (stock onnxruntime + numpy AdamW) trains every bundle kind as ONNX Runtime Training did.

For each tiny bundle the build makes (classify full depth and split; fp32, int8, int4; head
only; attention kept; causal LM full depth and split), the same 5-step plan runs on the
bundle here (the stock onnxruntime installed on the host) and on the bundle's own ORT Training
artifacts in a training-build process: random token ids or hidden states, padded rows, a first
step made of two weighted micro-batches, AdamW at lr 1e-2 (large, so parameters move far).

Tolerances (coordinator/bundler/probe.py has the reasoning): losses, gradients and evaluation
logits to 1e-5 of their largest magnitude (measured here: <= 4e-7; the rewrites change only
the order of float32 operations), parameters to 1e-4 of the most AdamW can move them, lr x
steps (measured: <= 7.2e-6). A wrong gradient formula shows up at 1e-2 or more, a wrong
optimizer at 0.1 or more of that bound.
"""

from __future__ import annotations

import pytest

from edgeftl.coordinator.bundler.probe import compare, probe_plan, train_reference
from edgeftl.coordinator.bundler.training_job import run_plan
from edgeftl.device.runtime import BundleRuntime

from fixtures_build import BUNDLES, bundle, reference

TOLERANCE = {"loss": 1e-5, "gradients": 1e-5, "eval logits": 1e-5, "parameters": 1e-4}
STEPS, LR = 5, 1e-2


def plan_for(folder) -> dict:
    return probe_plan(BundleRuntime(folder, threads=1), seed=1, steps=STEPS, lr=LR)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_portable_runtime_trains_like_the_training_build(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, name)
    plan = plan_for(folder)

    # Execute
    expected = train_reference(reference(tmp_path_factory, name), plan, threads=1)
    actual = run_plan(BundleRuntime(folder, threads=1), plan)

    # Assert
    differences = compare(actual, expected, plan)
    assert all(value <= TOLERANCE[what] for what, value in differences.items()), differences
    first, last = float(expected["loss.0"]), float(expected[f"loss.{STEPS - 1}"])
    assert first != last  # the plan really trained
