"""The coordinator's checkpoint: global parameters, round and server state, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeftl.device.files import atomic_path

CHECKPOINT = "checkpoint.npz"


def save(folder: Path, round_index: int, params: np.ndarray, reference: np.ndarray,
         strategy_state: dict[str, np.ndarray], meta: dict) -> None:
    """Write folder/checkpoint.npz via a temp file + rename: a crash leaves the previous one."""
    arrays: dict[str, Any] = {"params": params, "reference": reference,
                              **{f"strategy.{k}": v for k, v in strategy_state.items()}}
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "round": round_index}).encode(), dtype=np.uint8)
    with atomic_path(Path(folder) / CHECKPOINT) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # a handle: given a path without .npz, savez would add the suffix


def load(folder: Path) -> tuple[int, np.ndarray, np.ndarray, dict[str, np.ndarray], dict]:
    """Return (last completed round, params, downlink reference, strategy state, meta)."""
    with np.load(folder / CHECKPOINT, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        state = {k[len("strategy."):]: data[k] for k in data.files if k.startswith("strategy.")}
        return int(meta["round"]), data["params"].copy(), data["reference"].copy(), state, meta
