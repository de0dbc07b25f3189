"""The additive encoding of secure aggregation: fixed point in Z_(2^32), weight last.

A device with update x (float, length m) and integer weight w in 1..weight_cap sends
    v = [q(w * clip(x, -c, c)), w]        (m + 1 values, uint32)
with q(z) = round-half-even(z * scale) mod 2^32 (two's complement). The scale leaves headroom for
`max_devices` summands: every partial sum stays inside int32, so the sum of the vectors mod 2^32,
read back as int32, is exact:
    scale = (2^31 - 1 - max_devices) / (max_devices * weight_cap * c)      (float64)
The coordinator learns only sum(w * clip(x)) and sum(w): the weighted mean, and never a single
device's weight. Quantization error of the mean: at most max_devices / (2 * scale * sum(w)) per value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeftl.device.secagg.errors import SecAggError

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class FixedPoint:
    """How updates are clipped and scaled; the same on every device of a round."""

    clip: float = 1.0  # c: each value of an update is clipped to [-c, c]
    weight_cap: int = 1024  # a device's weight is min(samples, weight_cap)
    max_devices: int = 100  # summands the encoding leaves room for

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"bad clip: {self.clip!r}, expected a finite number > 0")
        for name in ("weight_cap", "max_devices"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= 2**20:
                raise SecAggError(f"bad {name}: {value!r}, expected an integer in 1..{2**20}")
        if self.scale < 1.0:
            raise SecAggError(f"bad fixed point: scale {self.scale:.3g} < 1 (lower clip, weight_cap or max_devices)")

    @property
    def scale(self) -> float:
        return (INT32_MAX - self.max_devices) / (self.max_devices * self.weight_cap * float(self.clip))

    def weight(self, samples: int) -> int:
        return max(1, min(int(samples), self.weight_cap))

    def encode(self, update: np.ndarray, weight: int) -> np.ndarray:
        """[q(weight * clip(update)), weight] as uint32 (length m + 1).

        Raises:
            SecAggError: a weight outside 1..weight_cap or a value that is not finite.
        """
        if type(weight) is not int or not 1 <= weight <= self.weight_cap:
            raise SecAggError(f"bad weight: {weight!r}, expected an integer in 1..{self.weight_cap}")
        values = np.asarray(update, dtype=np.float64)
        if not np.isfinite(values).all():
            raise SecAggError("not finite: the update holds NaN or Inf")
        scaled = np.rint(weight * np.clip(values, -self.clip, self.clip) * self.scale).astype(np.int64)
        return (np.concatenate([scaled, [weight]]) & 0xFFFFFFFF).astype(np.uint32)  # two's complement mod 2^32

    def decode(self, total: np.ndarray, survivors: int) -> tuple[np.ndarray, int]:
        """(weighted mean as float32, total weight) from the unmasked sum of `survivors` vectors.

        Raises:
            SecAggError: more survivors than max_devices, or a total weight outside what they can send.
        """
        if not 1 <= survivors <= self.max_devices:
            raise SecAggError(f"too many summands: {survivors}, the encoding has room for {self.max_devices}")
        signed = np.asarray(total, dtype=np.uint32).view(np.int32)
        weight = int(signed[-1])
        if not survivors <= weight <= survivors * self.weight_cap:
            raise SecAggError(f"bad sum: total weight {weight} is impossible for {survivors} devices")
        mean = signed[:-1].astype(np.float64) / (self.scale * weight)
        return mean.astype(np.float32), weight

    def max_error(self, survivors: int, total_weight: int) -> float:
        """The largest difference between the decoded mean and the true one (rounding only)."""
        return survivors / (2 * self.scale * total_weight)
