"""Aggregation strategies, one small module each; `make_strategy` builds one by name."""

from __future__ import annotations

from edgeftl.coordinator.rounds.strategy.base import Strategy, Update, weighted_mean
from edgeftl.coordinator.rounds.strategy.fedavg import FedAvg
from edgeftl.coordinator.rounds.strategy.fedopt import FedAdam, FedYogi
from edgeftl.coordinator.rounds.strategy.krum import Krum, MultiKrum
from edgeftl.coordinator.rounds.strategy.lora import LoraAware
from edgeftl.coordinator.rounds.strategy.median import CoordinateMedian
from edgeftl.coordinator.rounds.strategy.trimmed import TrimmedMean
from edgeftl.device.protocol.manifest import TrainableParam

STRATEGIES = ("fedavg", "fedadam", "fedyogi", "lora-svd", "median", "trimmed-mean", "krum", "multi-krum")
KRUM_STRATEGIES = ("krum", "multi-krum")  # the ones that need --byzantine

__all__ = ["KRUM_STRATEGIES", "STRATEGIES", "CoordinateMedian", "FedAdam", "FedAvg", "FedYogi", "Krum",
           "LoraAware", "MultiKrum", "Strategy", "TrimmedMean", "Update", "make_strategy", "weighted_mean"]


def make_strategy(name: str, trainable: list[TrainableParam] | None = None, server_lr: float | None = None, *,
                  trim_fraction: float = 0.1, byzantine: int = 0, krum_select: int = 0) -> Strategy:
    """Build a strategy by name.

    Args:
        name: one of STRATEGIES.
        trainable: the bundle manifest's trainable entries; lora-svd pairs LoRA factors by them.
        server_lr: the server learning rate; None takes the strategy's default.
        trim_fraction: trimmed-mean's share of values dropped from each side per coordinate.
        byzantine: f, the attackers krum and multi-krum tolerate.
        krum_select: updates multi-krum averages; 0 = n - f.

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
    if name == "median":
        return CoordinateMedian(server_lr or 1.0)
    if name == "trimmed-mean":
        return TrimmedMean(trim_fraction, server_lr or 1.0)
    if name == "krum":
        return Krum(byzantine, 1, server_lr or 1.0)
    if name == "multi-krum":
        return MultiKrum(byzantine, krum_select, server_lr or 1.0)
    raise ValueError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
