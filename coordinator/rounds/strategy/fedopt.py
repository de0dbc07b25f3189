"""Server-side adaptive optimizers: FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2). The weighted mean delta is a pseudo-gradient.
"""

from __future__ import annotations

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, weighted_mean


class FedAdam(Strategy):
    """m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;  x = x + lr * m / (sqrt(v) + tau)."""

    name = "fedadam"
    streams_mean = True

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        for label, value, low, high in (("server_lr", server_lr, 0, None), ("beta1", beta1, 0, 1),
                                        ("beta2", beta2, 0, 1), ("tau", tau, 0, None)):
            if not value > low or (high is not None and not value < high):
                raise ValueError(f"{self.name} {label} out of range: {value}")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2

    def aggregate(self, global_params: np.ndarray, updates: list[Update]) -> np.ndarray:
        delta = weighted_mean(updates).astype(np.float64)
        if self.m is None or self.v is None or self.m.shape != delta.shape:
            # The paper initialises v to tau^2 so the first step is not divided by ~0.
            self.m, self.v = np.zeros_like(delta), np.full_like(delta, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta * delta)
        step = self.server_lr * self.m / (np.sqrt(self.v) + self.tau)
        return (global_params + step).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m.copy(), "v": self.v.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "m" in state and "v" in state:
            self.m, self.v = np.asarray(state["m"], np.float64), np.asarray(state["v"], np.float64)


class FedYogi(FedAdam):
    """As FedAdam, but v = v - (1-b2) d^2 sign(v - d^2): v grows slowly, so steps stay larger."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)
