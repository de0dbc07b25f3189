"""Aggregation strategies, one small module each; `make_strategy` builds one by name."""

from __future__ import annotations

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, weighted_mean
from edgeftl.coordinator.rounds.strategy.fedavg import FedAvg
from edgeftl.coordinator.rounds.strategy.fedopt import FedAdam, FedYogi
from edgeftl.coordinator.rounds.strategy.lora import LoraAware
from edgeftl.device.protocol.manifest import TrainableParam

STRATEGIES = ("fedavg", "fedadam", "fedyogi", "lora-svd")

__all__ = ["STRATEGIES", "FedAdam", "FedAvg", "FedYogi", "LoraAware", "Strategy", "Update",
           "make_strategy", "weighted_mean"]


def make_strategy(name: str, trainable: list[TrainableParam] | None = None, server_lr: float | None = None) -> Strategy:
    """Build a strategy by name.

    Args:
        name: one of STRATEGIES.
        trainable: the bundle manifest's trainable entries; lora-svd pairs LoRA factors by them.
        server_lr: the server learning rate; None takes the strategy's default.

    Raises:
        ValueError: an unknown name, or lora-svd for trainable entries without LoRA factors.
    """
    if name == "fedavg":
        return FedAvg(server_lr or 1.0)
    if name == "fedadam":
        return FedAdam(server_lr or 1e-2)
    if name == "fedyogi":
        return FedYogi(server_lr or 1e-2)
    if name == "lora-svd":
        return LoraAware(trainable or [])
    raise ValueError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
