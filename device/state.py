"""The device's local state on disk, so a restarted device resumes exactly where it stopped.

    <dir>/CURRENT                 name of the complete version below (replaced atomically)
    <dir>/step-<N>/params.npy     trainable parameters as one float32 vector, manifest order
    <dir>/step-<N>/optimizer.npz  AdamW's step count and moments m, v (float32, same order)
    <dir>/step-<N>/state.json     bundle sha256, progress (step, epoch, RNG position), run settings

A save writes a new version folder and only then points CURRENT at it, so a failure at any
moment leaves the previous state complete and current. Parameters and moments are stored
exactly, so 2 + 2 steps with a restart in between give bit-identical parameters to 4 steps
straight. Only trainable values are saved: the frozen weights never change and stay in the
bundle (format 1 states also held an ORT checkpoint with every frozen weight).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.manifest import bundle_sha256, sha256_file

STATE_FORMAT = 2
CURRENT, PARAMS, OPTIMIZER, STATE_JSON = "CURRENT", "params.npy", "optimizer.npz", "state.json"


class StateError(ValueError):
    """A saved state that cannot be resumed; the message says why and what to do."""


@dataclass
class Progress:
    """Where training stands: batches done, and the data order of the epoch in progress."""

    step: int = 0  # batches trained, over all runs of this state
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already trained
    epoch_rng: dict = field(default_factory=dict)  # numpy bit_generator.state before the epoch's shuffle


@dataclass
class SavedState:
    """What `load_state` returns: the parameters and optimizer state to resume from, and the progress."""

    params: np.ndarray
    optimizer: dict[str, np.ndarray]
    progress: Progress
    settings: dict


def save_state(folder: Path, runtime, progress: Progress, settings: dict) -> Path:
    """Write the runtime's parameters, optimizer state and progress as the new current state.

    Args:
        folder: the state folder (created if missing).
        runtime: the `BundleRuntime` being trained.
        progress: where training stands after the last optimizer step.
        settings: run settings a resume must match (seed, batch, data sha256, ...).

    Returns:
        The version folder written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
    try:
        np.save(tmp / PARAMS, runtime.get_flat())
        np.savez(tmp / OPTIMIZER, **runtime.optimizer_state())
        info = {
            "format_version": STATE_FORMAT,
            "bundle_sha256": bundle_sha256(runtime.folder),
            "optimizer_sha256": sha256_file(tmp / OPTIMIZER),
            "params_sha256": sha256_file(tmp / PARAMS),
            "progress": asdict(progress),
            "settings": settings,
        }
        (tmp / STATE_JSON).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
        version = folder / f"step-{progress.step:09d}"
        if version.exists():
            if _current(folder) == version.name:  # same step saved already: nothing trained since
                shutil.rmtree(tmp, ignore_errors=True)
                return version
            shutil.rmtree(version)  # left by a save that failed before CURRENT moved
        os.rename(tmp, version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(folder / CURRENT, version.name + "\n")
    _prune(folder, keep=version.name)
    return version


def load_state(folder: Path, bundle: Path) -> SavedState | None:
    """The current state in `folder`, checked against `bundle`; None if there is none yet.

    Raises:
        StateError: if the state belongs to another bundle, is of an unknown format, or its
            files fail their sha256 (the state is left as it is).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StateError(f"--state {str(folder)!r} is a file; give a folder (it is created if missing)")
    if not (folder / CURRENT).is_file():
        if folder.exists() and any(p.name.startswith("step-") for p in folder.iterdir()):
            raise StateError(f"state folder {str(folder)!r} has no {CURRENT} file; it is not a complete state")
        return None
    version = folder / (_current(folder) or "")
    try:
        info = json.loads((version / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"state {str(version)!r} is unreadable ({exc}); use another --state folder") from exc
    if info.get("format_version") != STATE_FORMAT:
        raise StateError(f"state {str(version)!r} has format_version {info.get('format_version')!r}; "
                         f"this edgeftl reads {STATE_FORMAT} (format 1 was saved by the ONNX Runtime Training "
                         "runtime); use a new --state folder")
    if info.get("bundle_sha256") != bundle_sha256(bundle):
        raise StateError(f"state {str(folder)!r} was saved for another bundle (manifest sha256 "
                         f"{str(info.get('bundle_sha256'))[:12]}..., "
                         f"this bundle's is {bundle_sha256(bundle)[:12]}...); "
                         "use a new --state folder for this bundle")
    for name, key in ((OPTIMIZER, "optimizer_sha256"), (PARAMS, "params_sha256")):
        path = version / name
        if not path.is_file() or sha256_file(path) != info.get(key):
            raise StateError(f"state file {str(path)!r} is missing or fails its sha256; use another --state folder")
    with np.load(version / OPTIMIZER, allow_pickle=False) as data:
        optimizer = {key: data[key] for key in ("step", "m", "v") if key in data}
    if len(optimizer) != 3:
        raise StateError(f"state file {str(version / OPTIMIZER)!r} lacks step, m or v; use another --state folder")
    return SavedState(params=np.load(version / PARAMS, allow_pickle=False), optimizer=optimizer,
                      progress=Progress(**info["progress"]), settings=info.get("settings", {}))


def check_settings(saved: SavedState, settings: dict, folder: Path) -> None:
    """Refuse to resume with settings that change the data order (the RNG position would be meaningless)."""
    changed = sorted(k for k in settings if k in saved.settings and saved.settings[k] != settings[k])
    if changed:
        was = ", ".join(f"{k}={saved.settings[k]!r}" for k in changed)
        raise StateError(f"state {str(folder)!r} was saved with {was}; resume with the same values "
                         "or use a new --state folder")


def _current(folder: Path) -> str | None:
    try:
        return (folder / CURRENT).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _prune(folder: Path, keep: str) -> None:
    for path in folder.iterdir():
        if path.name != keep and (path.name.startswith("step-") or path.name.startswith(".saving-")):
            shutil.rmtree(path, ignore_errors=True)
