"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017).

Each update is scored by the sum of its squared L2 distances to its n - f - 2 nearest other
updates; Krum takes the update with the lowest score, Multi-Krum the uniform mean of the m lowest
(m = n - f by default; the scores are computed once, as Flower's implementation does, rather than
re-run on the shrinking set). Assumptions: at most f of the n updates are Byzantine and
n > 2f + 2, so every honest update has at least one honest neighbour counted and an attacker far
from the honest cluster scores high. Sample counts are ignored (the paper averages uniformly).

Too few updates for f: with 2f < n <= 2f + 2 the round falls back to the coordinate-wise median
(still an honest majority); with n <= 2f the global is kept unchanged. Both are logged and show in
the report (`fallback_median`, `kept_global`).
"""

from __future__ import annotations

import logging

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, checked_server_lr, stacked
from edgeftl.coordinator.rounds.strategy.median import coordinate_median

log = logging.getLogger("edgeftl.coordinator")


def krum_scores(deltas: np.ndarray, byzantine: int) -> np.ndarray:
    """(n,) Krum score of each row of deltas (n, params): summed squared distance to its n - f - 2 nearest.

    Raises:
        ValueError: n <= 2f + 2, where Krum's guarantee does not hold.
    """
    n = deltas.shape[0]
    if n <= 2 * byzantine + 2:
        raise ValueError(f"Krum needs more than 2f + 2 = {2 * byzantine + 2} updates for f = {byzantine}, got {n}")
    sq = (deltas * deltas).sum(axis=1)
    distances = np.maximum(sq[:, None] + sq[None, :] - 2 * deltas @ deltas.T, 0.0)  # (n, n) squared L2
    np.fill_diagonal(distances, np.inf)  # an update is not its own neighbour
    nearest = np.sort(distances, axis=1)[:, : n - byzantine - 2]
    return nearest.sum(axis=1)


def krum_select(deltas: np.ndarray, byzantine: int, select: int) -> np.ndarray:
    """Indices of the `select` lowest-scoring rows, best first (select 1 is Krum)."""
    return np.argsort(krum_scores(deltas, byzantine), kind="stable")[:select]


class Krum(Strategy):
    """x <- x + server_lr * mean of the `select` updates with the lowest Krum scores."""

    name = "krum"
    streams_mean = False  # keeps every update: scores are distances between every pair of updates

    def __init__(self, byzantine: int, select: int = 1, server_lr: float = 1.0) -> None:
        """byzantine: f, the attackers tolerated; select: m, 1 for Krum, 0 for Multi-Krum's n - f."""
        if byzantine < 0 or select < 0:
            raise ValueError(f"Krum needs byzantine >= 0 and select >= 0, got {byzantine} and {select}")
        self.byzantine, self.select = byzantine, select
        self.server_lr = checked_server_lr(server_lr)
        self.last_report: dict[str, float] = {}

    def report(self) -> dict[str, float]:
        return self.last_report

    def aggregate(self, global_params: np.ndarray, updates: list[Update]) -> np.ndarray:
        n, f = len(updates), self.byzantine
        if n <= 2 * f:
            log.warning("%s: %d updates cannot outvote f = %d attackers; keeping the global", self.name, n, f)
            self.last_report = {"selected": 0, "fallback_median": 0, "kept_global": 1}
            return global_params.astype(np.float32)
        if n <= 2 * f + 2:
            log.warning("%s: %d updates are too few for f = %d (needs > %d); coordinate-wise median this round",
                        self.name, n, f, 2 * f + 2)
            self.last_report = {"selected": n, "fallback_median": 1, "kept_global": 0}
            return (global_params + self.server_lr * coordinate_median(updates)).astype(np.float32)
        deltas = stacked(updates)
        chosen = krum_select(deltas, f, min(self.select or n - f, n))
        self.last_report = {"selected": len(chosen), "fallback_median": 0, "kept_global": 0}
        return (global_params + self.server_lr * deltas[chosen].mean(axis=0)).astype(np.float32)


class MultiKrum(Krum):
    """Krum with m = n - f selected by default (`select` 0)."""

    name = "multi-krum"

    def __init__(self, byzantine: int, select: int = 0, server_lr: float = 1.0) -> None:
        super().__init__(byzantine, select, server_lr)
