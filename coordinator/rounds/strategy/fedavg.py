"""FedAvg: the new global is the sample-weighted mean of the devices' local parameters."""

from __future__ import annotations

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, checked_server_lr, weighted_mean


class FedAvg(Strategy):
    """x <- x + server_lr * sum_i n_i delta_i / sum_i n_i  (server_lr = 1 is plain FedAvg)."""

    name = "fedavg"
    streams_mean = True

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = checked_server_lr(server_lr)

    def aggregate(self, global_params: np.ndarray, updates: list[Update]) -> np.ndarray:
        return (global_params + self.server_lr * weighted_mean(updates)).astype(np.float32)
