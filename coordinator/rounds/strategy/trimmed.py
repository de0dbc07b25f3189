"""Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018).

For each parameter, drop the k = floor(fraction x n) largest and k smallest device values and
average the rest. Assumptions: at most k of the n updates are Byzantine (so choose fraction >= the
share of attackers you expect); then each coordinate is a mean of values bounded by honest ones.
Sample counts are ignored. With fraction x n < 1 nothing is trimmed and it is the plain
(unweighted) mean, which the report and the log say.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, checked_server_lr, stacked

log = logging.getLogger("edgeftl.coordinator")


def check_trim_fraction(fraction: float) -> float:
    """fraction itself, or ValueError when it is outside [0, 0.5)."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"--trim-fraction must be in [0, 0.5) (the share trimmed from each side), got {fraction}")
    return fraction


def trimmed_mean(updates: list[Update], fraction: float) -> tuple[np.ndarray, int]:
    """The coordinate-wise mean after dropping floor(fraction n) values from each end, and that count."""
    values = np.sort(stacked(updates), axis=0)  # (n, params), each column sorted
    n = values.shape[0]
    k = math.floor(check_trim_fraction(fraction) * n)
    return values[k: n - k].mean(axis=0).astype(np.float32), k


class TrimmedMean(Strategy):
    """x <- x + server_lr * trimmed_mean_i delta_i, per coordinate."""

    name = "trimmed-mean"
    streams_mean = False  # keeps every update: which values are trimmed is known only once all have arrived

    def __init__(self, fraction: float = 0.1, server_lr: float = 1.0) -> None:
        self.fraction = check_trim_fraction(fraction)
        self.server_lr = checked_server_lr(server_lr)
        self.last_report: dict[str, float] = {}

    def report(self) -> dict[str, float]:
        return self.last_report

    def aggregate(self, global_params: np.ndarray, updates: list[Update]) -> np.ndarray:
        delta, k = trimmed_mean(updates, self.fraction)
        if k == 0:
            log.warning("trimmed mean: trim fraction %s of %d updates trims none; this round is the plain mean",
                        self.fraction, len(updates))
        self.last_report = {"trimmed_per_side": k}
        return (global_params + self.server_lr * delta).astype(np.float32)
