"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018).

Each parameter of the aggregate delta is the median of the devices' values for it. Assumptions:
fewer than half of the round's updates are Byzantine (then every coordinate lies between two
honest values, however large the others are); sample counts are ignored, so inflating them buys
nothing. Costs: with non-IID honest data the median is a noisier, slightly biased estimate of the
mean, so an honest run converges a little slower than FedAvg.
"""

from __future__ import annotations

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, checked_server_lr, stacked


def coordinate_median(updates: list[Update]) -> np.ndarray:
    """The coordinate-wise median of the deltas (the mean of the middle two for an even count)."""
    return np.median(stacked(updates), axis=0).astype(np.float32)


class CoordinateMedian(Strategy):
    """x <- x + server_lr * median_i delta_i, per coordinate."""

    name = "median"
    streams_mean = False  # keeps every update: a coordinate's median needs every device's value

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = checked_server_lr(server_lr)

    def aggregate(self, global_params: np.ndarray, updates: list[Update]) -> np.ndarray:
        return (global_params + self.server_lr * coordinate_median(updates)).astype(np.float32)
