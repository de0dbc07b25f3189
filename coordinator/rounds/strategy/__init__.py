"""Aggregation strategies, one small module each; `make_strategy` builds one by name."""

from __future__ import annotations

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, weighted_mean
from edgeftl.coordinator.rounds.strategy.fedavg import FedAvg
from edgeftl.coordinator.rounds.strategy.fedopt import FedAdam, FedYogi
from edgeftl.coordinator.rounds.strategy.lora import LoraAware

STRATEGIES = ("fedavg", "fedadam", "fedyogi", "lora-svd")

__all__ = ["STRATEGIES", "FedAdam", "FedAvg", "FedYogi", "LoraAware", "Strategy", "Update",
           "make_strategy", "weighted_mean"]


def make_strategy(name: str, layout: list[dict] | None = None, server_lr: float | None = None) -> Strategy:
    """Build a strategy by name; `layout` (manifest trainable entries) is needed by lora-svd."""
    if name == "fedavg":
        return FedAvg(server_lr or 1.0)
    if name == "fedadam":
        return FedAdam(server_lr or 1e-2)
    if name == "fedyogi":
        return FedYogi(server_lr or 1e-2)
    if name == "lora-svd":
        return LoraAware(layout or [])
    raise ValueError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
