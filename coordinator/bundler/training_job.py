"""Jobs run in a process of their own: artifacts and reference runs on the training build, plan runs anywhere.

    python -m edgeftl.coordinator.bundler.training_job artifacts MODEL TRAINABLE_JSON OUT_DIR
    python -m edgeftl.coordinator.bundler.training_job reference ARTIFACTS PLAN_NPZ RESULT_NPZ [THREADS]
    python -m edgeftl.coordinator.bundler.training_job infer MODEL FEEDS_NPZ RESULT_NPZ
    python -m edgeftl.coordinator.bundler.training_job portable BUNDLE PLAN_NPZ RESULT_NPZ [THREADS]

The first three need a process whose `onnxruntime` is the training build
(`training_build.run_job` starts those). `portable` runs a plan on the device runtime with
whatever stock onnxruntime the process has: the equivalence tests run it on other Pythons,
onnxruntime versions and architectures (an emulated ARM64 board) and compare with `reference`.

`artifacts` generates the ORT Training graphs (training, eval, AdamW optimizer) and checkpoint
for an exported task model. `reference` trains those artifacts on the batches of a plan with
the training build's own Module and Optimizer, and writes what the portable runtime must
reproduce (see `run_plan`). `infer` runs any ONNX model once with the training build's
InferenceSession (tests compare single training-only ops with their rewrites). Plans, feeds
and results are .npz files:

    plan    lr, steps; per step s and micro-batch m: s{s}.m{m}.{features,mask,targets,weight}
    result  loss.{s} (the step's weighted loss), grad.{name} (step 0's accumulated gradient),
            param.{name} (after every step), eval.loss / eval.logits (step 0's first micro-batch, after)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def generate_artifacts(model_path: Path, trainable: list[str], out: Path) -> None:
    """ORT Training artifacts for `model_path`; every initializer that is not trainable is a frozen parameter.

    Frozen parameters are stored once, in the checkpoint, at their own dtype, instead of as
    constants in both graphs. The task model outputs (loss, logits); `logits` rides along.
    """
    import onnx

    from edgeftl.coordinator.bundler.reference import training_api

    training_api()  # the training package without its torch-importing __init__ (saves ~2 s per build)
    from onnxruntime.training import artifacts

    model = onnx.load(str(model_path))
    names = [init.name for init in model.graph.initializer]
    frozen = [name for name in names if name not in set(trainable)]
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    with native_stderr_captured():
        artifacts.generate_artifacts(model, requires_grad=list(trainable), frozen_params=frozen, loss=None,
                                     optimizer=artifacts.OptimType.AdamW, artifact_directory=out,
                                     loss_input_names=["loss"], additional_output_names=["logits"])


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


def run_plan(runtime, plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Train `runtime` through `plan`; return the result arrays (module docstring).

    `runtime` is a `ReferenceRuntime` here, or the device's `BundleRuntime` in the build's probe:
    both accumulate, step, evaluate and name their parameters and gradients.
    """
    runtime.set_learning_rate(float(plan["lr"]))
    result: dict[str, np.ndarray] = {}
    for step in range(int(plan["steps"])):
        loss = 0.0
        for batch in micro_batches(plan, step):
            loss += runtime.accumulate(*batch[:3], weight=float(batch[3])) * float(batch[3])
        result[f"loss.{step}"] = np.array(loss)
        if step == 0:
            result.update({f"grad.{k}": v for k, v in runtime.gradients().items()})
        runtime.apply_step()
    result.update({f"param.{k}": v for k, v in runtime.parameters().items()})
    first = next(iter(micro_batches(plan, 0)))
    result["eval.loss"], result["eval.logits"] = (np.array(x) for x in runtime.eval_step(*first[:3]))
    return result


def micro_batches(plan: dict[str, np.ndarray], step: int) -> list[tuple[np.ndarray, ...]]:
    """(features, mask, targets, weight) of each micro-batch of `step`, in order."""
    out, micro = [], 0
    while f"s{step}.m{micro}.features" in plan:
        prefix = f"s{step}.m{micro}."
        out.append(tuple(plan[prefix + k] for k in ("features", "mask", "targets", "weight")))
        micro += 1
    return out


def _runtime(kind: str, folder: Path, threads: int | None):
    if kind == "reference":  # ORT Training artifacts, on the training build
        from edgeftl.coordinator.bundler.reference import ReferenceRuntime

        return ReferenceRuntime(folder, threads)
    from edgeftl.device.runtime import BundleRuntime  # a bundle, on this process's stock onnxruntime

    return BundleRuntime(folder, threads=threads)


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "artifacts":
        model, trainable, out = args
        generate_artifacts(Path(model), json.loads(Path(trainable).read_text()), Path(out))
    elif command in ("reference", "portable"):
        folder, plan, result, *threads = args
        with np.load(plan) as data:
            arrays = dict(data)
        runtime = _runtime(command, Path(folder), int(threads[0]) if threads else None)
        np.savez(result, **run_plan(runtime, arrays))
    elif command == "infer":
        from edgeftl.coordinator.bundler.reference import training_api

        training_api()  # registers the training ops' package without importing torch (seconds)
        import onnxruntime as ort

        model, feeds, result = args
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        with np.load(feeds) as data:
            outputs = session.run(None, dict(data))
        np.savez(result, **{o.name: v for o, v in zip(session.get_outputs(), outputs)})
    else:
        print(f"unknown command {command!r}; accepted: artifacts, reference, infer, portable", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
