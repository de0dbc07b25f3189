"""What the round loop keeps of the round's accepted updates until it closes: pure numpy.

A strategy that uses only the weighted mean of the updates (`Strategy.streams_mean`: FedAvg,
FedAdam, FedYogi; and client-level DP, whose noisy mean stands in for any strategy it allows) needs
no update after it is decoded: `StreamingMean` clips it and folds it into one float64 running sum,
so a round of n sampled devices holds O(params), not O(n x params). The strategies that look at
individual updates (median, trimmed mean, Krum, and lora-svd, whose exact mean of B_i A_i products
would need a dense out x in running sum per adapted layer, larger than the factors themselves)
keep them all in `KeptUpdates`, as before.

The guards stay exact. Clipping is per update. The weight cap (x the round's median weight) is known
only at close, so each update is added with its weight capped at ratio x the median of the weights
seen so far (which keeps the running sum free of a huge claimed weight's rounding error), its
weight and the weight it was added with are remembered (two floats), and at close the few updates
whose added weight differs from the final capped one are read back (`reload`: the journal holds
every accepted update's bytes) and corrected. Both paths give the same `guard_updates` report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgeftl.coordinator.rounds.privacy.mechanism import ClientDp
from edgeftl.coordinator.rounds.strategy.base import Update
from edgeftl.coordinator.rounds.strategy.guard import clip_l2, guard_report, guard_updates

Reload = Callable[[str], np.ndarray]  # device id -> the decoded delta it sent this round


@dataclass
class Accepted:
    """What the round record needs of an accepted update once its vector has been folded in."""

    device_id: str
    metrics: dict
    payload_bytes: int

    @classmethod
    def of(cls, device_id: str, samples: int, metrics: dict, payload_bytes: int) -> Accepted:
        """The record's view of an update: its metrics, and the header's sample count with them (devices
        stopped repeating it among their metrics to keep headers small)."""
        return cls(device_id, {"samples": samples, **metrics}, payload_bytes)


@dataclass
class Closed:
    """A closed round's input for the strategy, and what the guards did (for the round record)."""

    updates: list[Update]
    guarded: dict = field(default_factory=dict)


class KeptUpdates:
    """Every update kept whole until the round closes: for strategies that need them all."""

    streaming = False

    def __init__(self, updates: list[Update] | None = None) -> None:
        self.updates: list[Update] = list(updates or [])

    def __len__(self) -> int:
        return len(self.updates)

    def add(self, device_id: str, delta: np.ndarray, weight: float) -> None:
        self.updates.append(Update(delta, weight))

    def close(self, clip_norm: float, max_weight_ratio: float, privacy: ClientDp | None,
              round_index: int, sampled: int, online: int) -> Closed:
        """Guard every update, then (with DP) replace them by their one noisy mean."""
        updates, guarded = guard_updates(self.updates, clip_norm, max_weight_ratio)
        if privacy is not None:  # the strategy sees one noisy mean, never a device's update
            updates = [privacy.noisy_mean(updates, round_index, sampled, online)]
        return Closed(updates, guarded)


class StreamingMean:
    """The round's clipped updates folded into one running sum as they arrive.

    Args:
        size: the parameter count.
        clip_norm: per-update L2 clip (0 = none), as guard.clip_updates.
        max_weight_ratio: the weight cap, x the round's median weight (0 = none), as guard.cap_weights.
        private: client-level DP: sum the clipped deltas unweighted (mechanism.gaussian_mean).
        reload: reads an accepted update's delta back, for the weight cap's correction at close.
    """

    streaming = True

    def __init__(self, size: int, clip_norm: float, max_weight_ratio: float, private: bool, reload: Reload) -> None:
        self.clip_norm, self.max_weight_ratio, self.private, self.reload = clip_norm, max_weight_ratio, private, reload
        self.total = np.zeros(size, dtype=np.float64)
        self.devices: list[str] = []
        self.weights: list[float] = []  # as claimed
        self.added: list[float] = []  # as folded into `total` (differs from the final cap for a few)
        self.norms: list[float] = []  # L2 as received, for the guard report

    def __len__(self) -> int:
        return len(self.devices)

    def add(self, device_id: str, delta: np.ndarray, weight: float) -> None:
        """Clip the delta and fold it in; the caller may drop it afterwards."""
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"update weights must be positive and finite, got {weight}")
        clipped, norm = clip_l2(delta, self.clip_norm)
        self.devices.append(device_id)
        self.weights.append(float(weight))
        self.norms.append(norm)
        if self.private:  # gaussian_mean clips what the guard clipped once more, unweighted
            self.total += clip_l2(clipped, self.clip_norm)[0].astype(np.float64)
            self.added.append(1.0)
            return
        added = min(float(weight), self._cap())
        scaled = clipped.astype(np.float64)  # one temporary: memory stays at a few vectors
        scaled *= added
        self.total += scaled
        self.added.append(added)

    def _cap(self) -> float:
        """ratio x the median of the weights so far (inf without a cap)."""
        if self.max_weight_ratio <= 0 or not self.weights:
            return float("inf")
        return self.max_weight_ratio * float(np.median(self.weights))

    def close(self, clip_norm: float, max_weight_ratio: float, privacy: ClientDp | None,
              round_index: int, sampled: int, online: int) -> Closed:
        """The round's one mean update (weight 1), exactly as the kept updates would give it.

        clip_norm and max_weight_ratio must be those this accumulator was made with (the same
        signature as KeptUpdates.close, so the loop closes either the same way).
        """
        if (clip_norm, max_weight_ratio) != (self.clip_norm, self.max_weight_ratio):
            raise ValueError("StreamingMean closed with guard settings other than it was made with")
        if not self.devices:
            raise ValueError("cannot aggregate zero updates")
        cap = self._cap()
        guarded = guard_report(self.norms, clip_norm, sum(w > cap for w in self.weights))
        if privacy is not None:
            if not self.private:
                raise ValueError("StreamingMean made without DP closed with DP")
            return Closed([privacy.noisy_mean_of_sum(self.total, len(self), round_index, sampled, online)], guarded)
        total = self._corrected(cap)
        mean = total / sum(min(w, cap) for w in self.weights)
        return Closed([Update(mean.astype(np.float32), 1.0)], guarded)

    def _corrected(self, cap: float) -> np.ndarray:
        """The running sum with every update whose added weight is not its final capped weight
        read back and re-weighted (none in a round without outsized claims)."""
        total = self.total.copy()
        for device, weight, added in zip(self.devices, self.weights, self.added):
            target = min(weight, cap)
            if target != added:
                clipped = clip_l2(self.reload(device), self.clip_norm)[0]
                total += (target - added) * clipped.astype(np.float64)
        return total
