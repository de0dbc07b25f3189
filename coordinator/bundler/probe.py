"""The build's check that a portable bundle trains as ONNX Runtime Training did: a probe plan on both.

The bundle in staging is loaded by the device runtime (stock onnxruntime, numpy AdamW) and its
reference artifacts by the training build (`training_job reference`, another process). Both
train the same random probe plan: two optimizer steps, the first as two weighted micro-batches
(gradient accumulation), then evaluate. Losses, step 0's gradients, the parameters after both
steps and the evaluation logits must agree within `TOLERANCE`, or the build fails.

Tolerances. Losses, gradients and logits are compared relative to their largest magnitude: the
rewrite changes the order of float32 operations, never the math, so they agree to ~1e-7
(tiny models) and ~1e-6 (MiniLM builds: at most 9.4e-7 for gradients, 3.8e-6 for logits);
1e-4 leaves room for other models and thread counts, and a wrong gradient formula shows up at
1e-2 or more. Parameters
are compared relative to the most AdamW can move them (lr per step, times the steps): AdamW
divides each gradient entry by its own running magnitude, so an entry that cancels to almost
nothing, and so differs relatively more between the two runtimes, still moves its parameter by
up to lr. MiniLM's parameters after the probe differed by up to 4.8e-4 of that bound, but
SmolLM2-135M (49,152-word vocabulary) by 2.0e-2 (fp32, LoRA in the top 2 blocks), 1.7e-2 (fp32,
all 30 blocks) and 1.04e-2 (int8 top 2, LM loss in vocabulary blocks), with gradients agreeing
to 9.8e-6: an entry whose gradient is within float32 noise of zero can take AdamW's sign-like
first step either way. 5e-2 still catches any optimizer that does not compute what ORT's AdamW
computes (a wrong bias correction alone is a factor 2-3 in the first steps, ~1 of the bound).
The eval logits come after those two steps and inherit that spread (SmolLM2: 7.0e-5 and
1.1e-4), so they get 1e-3; a wrong forward or gradient shows up at 1e-2 or more.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgeftl.coordinator.bundler.config import BuildError
from edgeftl.coordinator.bundler.training_build import run_job
from edgeftl.coordinator.bundler.training_job import run_plan

TOLERANCE = {"loss": 1e-4, "gradients": 1e-4, "parameters": 5e-2, "eval logits": 1e-3}
PROBE_ROWS, PROBE_SEQ, PROBE_LR = 4, 16, 1e-2


def probe_plan(runtime, seed: int = 0, steps: int = 2, rows: int = PROBE_ROWS, lr: float = PROBE_LR) -> dict:
    """A plan (`training_job` format) of random batches this bundle accepts; step 0 has two micro-batches."""
    from edgeftl.device.train import loss_shares, loss_units

    rng = np.random.default_rng(seed)
    manifest = runtime.manifest
    seq = min(PROBE_SEQ, manifest.max_seq_len)
    plan: dict[str, np.ndarray] = {"lr": np.array(lr), "steps": np.array(steps)}
    for step in range(steps):
        ids = rng.integers(0, runtime.tokenizer.get_vocab_size(), size=(rows, seq), dtype=np.int64)
        mask = np.zeros((rows, seq), dtype=np.int64)
        for row, length in enumerate(rng.integers(seq // 2, seq + 1, size=rows)):
            mask[row, :length] = 1
        labels = ([manifest.labels[i] for i in rng.integers(0, len(manifest.labels), size=rows)]
                  if manifest.labels else None)
        targets = runtime.targets(ids, mask, labels)
        features = ids if not manifest.split else rng.normal(size=(rows, seq, manifest.hidden_size)).astype(np.float32)
        parts = [slice(0, rows // 2), slice(rows // 2, rows)] if step == 0 else [slice(0, rows)]
        shares = loss_shares([loss_units(runtime, targets[part]) for part in parts])
        for micro, (part, share) in enumerate(zip(parts, shares)):
            prefix = f"s{step}.m{micro}."
            plan[prefix + "features"], plan[prefix + "mask"], plan[prefix + "targets"] = (
                features[part], mask[part], targets[part])
            plan[prefix + "weight"] = np.array(share, dtype=np.float32)
    return plan


def compare(portable: dict, reference: dict, plan: dict) -> dict[str, float]:
    """Largest difference of each compared quantity, relative to its scale (module docstring)."""
    groups = {"loss": "loss.", "gradients": "grad.", "parameters": "param.", "eval logits": "eval.logits"}
    out = {}
    for label, prefix in groups.items():
        keys = sorted(k for k in reference if k.startswith(prefix))
        missing = [k for k in keys if k not in portable]
        if missing or not keys:
            raise BuildError(f"probe: the portable runtime produced no {missing[:3] or prefix!r}")
        if label == "parameters":
            scale = float(plan["lr"]) * int(plan["steps"])  # the most AdamW can move a parameter
        else:
            scale = max(float(np.abs(reference[k]).max(initial=0.0)) for k in keys) or 1.0
        out[label] = max(float(np.abs(np.asarray(portable[k], dtype=np.float64) - reference[k]).max(initial=0.0))
                         for k in keys) / scale
    return out


def train_reference(reference: Path, plan: dict, threads: int | None = None) -> dict[str, np.ndarray]:
    """`run_plan`'s result for ORT Training's own artifacts in `reference`, from a training-build process."""
    with tempfile.TemporaryDirectory(prefix="edgeftl-probe-") as work:
        np.savez(Path(work) / "plan.npz", **plan)
        run_job("reference", reference, Path(work) / "plan.npz", Path(work) / "result.npz",
                *([threads] if threads else []))
        with np.load(Path(work) / "result.npz") as data:
            return dict(data)


def check_bundle(bundle: Path, reference: Path, threads: int | None = None) -> dict[str, float]:
    """Train the probe plan on the bundle (stock ORT) and on `reference` (training build); compare.

    Returns:
        The relative differences by quantity (all within `TOLERANCE`).

    Raises:
        BuildError: a difference beyond its tolerance, naming it.
    """
    from edgeftl.device.runtime import BundleRuntime

    runtime = BundleRuntime(bundle, threads=threads, verify=False)
    plan = probe_plan(runtime)
    differences = compare(run_plan(runtime, plan), train_reference(reference, plan, threads), plan)
    bad = {k: v for k, v in differences.items() if not v <= TOLERANCE[k]}
    if bad:
        what = ", ".join(f"{k} by {v:.2e} (tolerance {TOLERANCE[k]:.0e})" for k, v in bad.items())
        raise BuildError(f"the portable training graph diverges from ONNX Runtime Training on a probe batch: {what}; "
                         "please report this model")
    return differences
