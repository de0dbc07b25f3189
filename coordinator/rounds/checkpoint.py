"""The coordinator's checkpoint: global parameters, round, server state and the round's record,
written atomically.

The checkpoint of round r is written before round r's global is published and before its
record is appended to metrics.jsonl, and it carries that record: a coordinator killed between
the two finds the record here on resume (`reconcile_records`) instead of losing it, and devices
never hold a global the checkpoint does not. `load` checks everything it reads and raises
CheckpointError with one line naming the file and what to do.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeftl.coordinator.rounds import records
from edgeftl.device.files import atomic_path, atomic_write

CHECKPOINT = "checkpoint.npz"
_RESTART = "run without --resume (and with --force) to start over, or give another --out"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def save(folder: Path, round_index: int, params: np.ndarray, reference: np.ndarray,
         strategy_state: dict[str, np.ndarray], meta: dict, record: dict | None = None) -> None:
    """Write folder/checkpoint.npz via a temp file + rename: a crash leaves the previous one."""
    arrays: dict[str, Any] = {"params": params, "reference": reference,
                              **{f"strategy.{k}": v for k, v in strategy_state.items()}}
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "round": round_index, "record": record}).encode(),
                                   dtype=np.uint8)
    with atomic_path(Path(folder) / CHECKPOINT) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # a handle: given a path without .npz, savez would add the suffix


Loaded = tuple[int, np.ndarray, np.ndarray, dict[str, np.ndarray], dict]


def load(folder: Path, size: int, bundle_sha256: str) -> Loaded:
    """Return (last completed round, params, downlink reference, strategy state, meta).

    Raises:
        CheckpointError: missing, unreadable, truncated, of another bundle, a parameter vector of
            another length than `size`, or values that are not finite.
    """
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint {str(path)!r}; run without --resume to start at round 0")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            state = {k[len("strategy."):]: data[k] for k in data.files if k.startswith("strategy.")}
            params, reference = data["params"].copy(), data["reference"].copy()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(exc).__name__}); {_RESTART}") from None
    if not isinstance(meta, dict) or type(meta.get("round")) is not int or meta["round"] < 0:
        raise CheckpointError(f"checkpoint {str(path)!r} has no valid round in its meta; {_RESTART}")
    if meta.get("bundle_sha256") != bundle_sha256:
        raise CheckpointError(f"checkpoint {str(path)!r} is for another bundle; use a new --out "
                              "or the bundle it was made with")
    for name, vector in (("params", params), ("reference", reference)):
        if vector.dtype != np.float32 or vector.shape != (size,):
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} is {vector.dtype} {vector.shape}, the bundle "
                                  f"needs float32 ({size},); {_RESTART}")
    if not all(np.isfinite(v).all() for v in (params, reference, *state.values()) if v.dtype.kind == "f"):
        raise CheckpointError(f"checkpoint {str(path)!r} holds NaN or Inf; {_RESTART}")
    return meta["round"], params, reference, state, meta


def reconcile_records(folder: Path, meta: dict) -> int:
    """Make metrics.jsonl hold exactly one record per round up to the checkpoint's: drop a
    truncated last line and records of later rounds, append the checkpoint's record if missing.

    Returns:
        The number of records appended (0 or 1).
    """
    path, last = Path(folder) / records.METRICS, meta["round"]
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    kept, rounds = [], set()
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] <= last \
                and record["round"] not in rounds:
            kept.append(line)
            rounds.add(record["round"])
    if "".join(kept) != text:
        atomic_write(path, "".join(kept))
    if last in rounds or not isinstance(meta.get("record"), dict):
        return 0
    records.append(folder, meta["record"])
    return 1


def refuse_old_run(folder: Path) -> None:
    """A new run must not overwrite another run's checkpoint or mix records with its metrics.

    Raises:
        CheckpointError: when folder already holds a checkpoint or metrics.
    """
    found = [name for name in (CHECKPOINT, records.METRICS) if (Path(folder) / name).exists()]
    if found:
        raise CheckpointError(f"--out {str(folder)!r} already holds {' and '.join(found)} of another run; "
                              "add --resume to continue it, --force to replace it, or give another --out")


def start_fresh(folder: Path) -> None:
    """Drop an old run's checkpoint and records (--force)."""
    (Path(folder) / CHECKPOINT).unlink(missing_ok=True)
    records.start_fresh(folder)
