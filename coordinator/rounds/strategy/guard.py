"""Guards applied to each accepted update before any strategy sees it: pure numpy.

Per-update L2 clipping bounds what one device can move the global by (the first defence against
a scaled update, and the sensitivity that client-level differential privacy needs).
"""

from __future__ import annotations

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Update


def clip_l2(delta: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """The delta scaled down to L2 norm <= max_norm (unchanged when already inside), and its norm before."""
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if max_norm <= 0 or norm <= max_norm:
        return delta, norm
    return (delta * np.float32(max_norm / norm)).astype(np.float32), norm


def clip_updates(updates: list[Update], max_norm: float) -> tuple[list[Update], list[float]]:
    """Every update clipped to max_norm (0 = no clipping), with the norms they arrived with."""
    clipped = [clip_l2(u.delta, max_norm) for u in updates]
    return [Update(delta, u.weight) for (delta, _), u in zip(clipped, updates)], [norm for _, norm in clipped]
