"""Aggregation strategies: global vector + device deltas in, next global vector out.

Pure numpy, no network, no disk (Flower keeps strategies the same way). Devices send deltas
(local parameters minus the global parameters they started the round from), weighted by their
sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Update:
    """One device's contribution to a round."""

    delta: np.ndarray  # float32 (n,): local - global
    weight: float  # usually the number of local training samples


class Strategy:
    """Turns the round's accepted updates into the next global parameters."""

    name = "base"
    # True when aggregate() uses only the weighted mean of the updates: the round loop then folds
    # each update into a running sum as it arrives and hands over one mean update (weight 1), which
    # aggregates exactly as the list would (coordinator/rounds/accumulate.py). False keeps them all.
    streams_mean = False

    def aggregate(self, global_params: np.ndarray, updates: list[Update]) -> np.ndarray:
        raise NotImplementedError

    def report(self) -> dict[str, float]:
        """What the last aggregation measured about itself, for the round record; empty by default."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """Server-side state to checkpoint (optimizer moments); empty for stateless strategies."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state() returned."""


def weighted_mean(updates: list[Update]) -> np.ndarray:
    """Sum of w_i * delta_i / sum of w_i (FedAvg's average, McMahan et al. 2017)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    weights = np.array([u.weight for u in updates], dtype=np.float64)
    if (weights <= 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"update weights must be positive and finite, got {weights.tolist()}")
    total = np.zeros_like(updates[0].delta, dtype=np.float64)
    for update, weight in zip(updates, weights):
        total += weight * update.delta.astype(np.float64)
    return (total / weights.sum()).astype(np.float32)


def stacked(updates: list[Update]) -> np.ndarray:
    """The deltas as one float64 matrix (n updates, n parameters), for coordinate-wise statistics."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return np.stack([u.delta.astype(np.float64) for u in updates])


def checked_server_lr(server_lr: float) -> float:
    """server_lr itself, or ValueError when it is not positive."""
    if not server_lr > 0:
        raise ValueError(f"server learning rate must be positive, got {server_lr}")
    return server_lr
