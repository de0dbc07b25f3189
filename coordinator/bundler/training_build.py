"""ONNX Runtime Training on the host, beside stock ONNX Runtime: where it lives and how the build uses it.

The build needs the training build (onnxruntime-training-cpu 1.19.2, the last release) for one
thing no other tool does: generating gradient graphs. It also serves as the reference the
build checks its portable graphs against. Devices, the coordinator and everything else in the
host process use stock `onnxruntime`. Both distributions install a package named `onnxruntime`,
so installed side by side with pip they overwrite each other's files; instead the training
build is unpacked into a folder of its own and used only by child processes that put that
folder first on their path (`run_job`). So `pip install edgeftl[host]` never has the two fight.

    $EDGEFTL_ORT_TRAINING, else ~/.cache/edgeftl/ort-training/onnxruntime-training-cpu-1.19.2-cp311-<machine>

It has wheels for CPython 3.11 on x86_64 only (FACTS): building bundles needs such a host;
the bundles themselves run anywhere stock ONNX Runtime does.

    python -m edgeftl.coordinator.bundler.training_build     # install it now (make install does)
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeftl.coordinator.bundler.config import BuildError

if TYPE_CHECKING:
    import onnx

PACKAGE, VERSION = "onnxruntime-training-cpu", "1.19.2"
ENV = "EDGEFTL_ORT_TRAINING"
PYTHON = (3, 11)
JOB_MODULE = "edgeftl.coordinator.bundler.training_job"


def location() -> Path:
    """Where the training build is (or will be) unpacked."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    from edgeftl.device.cache import default_cache_dir

    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}"
    return default_cache_dir() / "ort-training" / f"{PACKAGE}-{VERSION}-{tag}"


def installed(folder: Path | None = None) -> bool:
    return ((folder or location()) / "onnxruntime" / "training" / "api" / "module.py").is_file()


def ensure(log=print) -> Path:
    """The training build's folder, unpacked there with pip on first use (atomically).

    Raises:
        BuildError: not CPython 3.11, or pip failed (its last lines in the message).
    """
    folder = location()
    if installed(folder):
        return folder
    if sys.version_info[:2] != PYTHON:
        raise BuildError(f"generating training graphs needs ONNX Runtime Training {VERSION}, which has wheels for "
                         f"CPython {PYTHON[0]}.{PYTHON[1]} only; this is {platform.python_version()}. Build bundles "
                         f"with Python {PYTHON[0]}.{PYTHON[1]} (devices may run any of 3.10-3.13)")
    log(f"installing {PACKAGE}=={VERSION} into {folder} (once; used only to generate training graphs)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                               str(staging), f"{PACKAGE}=={VERSION}"], capture_output=True, text=True)
        if done.returncode or not installed(staging):
            raise BuildError(f"pip could not install {PACKAGE}=={VERSION}: "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        if not installed(folder):
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def job_env() -> dict[str, str]:
    """The environment of a child process whose `import onnxruntime` is the training build."""
    folder = ensure(log=lambda message: print(f"edgeftl: {message}", file=sys.stderr))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *([path] if path else [])])}


def run_job(*args: str | Path) -> None:
    """Run `training_job` with these arguments in a training-build process.

    Raises:
        BuildError: the job failed; the message carries the end of its output.
    """
    done = subprocess.run([sys.executable, "-m", JOB_MODULE, *map(str, args)], env=job_env(),
                          capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise BuildError(f"ONNX Runtime Training step {args[0]!r} failed (exit {done.returncode}):\n{tail}")


def infer(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `model` run once by the training build (which registers its training-only ops)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgeftl-infer-") as work:
        folder = Path(work)
        onnx.save(model, str(folder / "model.onnx"))
        np.savez(folder / "feeds.npz", **feeds)
        run_job("infer", folder / "model.onnx", folder / "feeds.npz", folder / "result.npz")
        with np.load(folder / "result.npz") as data:
            return dict(data)


if __name__ == "__main__":
    print(ensure())
