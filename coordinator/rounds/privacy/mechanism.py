"""Client-level differential privacy for the round loop: DP-FedAvg's Gaussian mean (pure numpy).

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018), Algorithm 1 with the fixed-denominator estimator: each device's delta is clipped to
L2 norm C, the clipped deltas are summed and divided by n, the number of devices sampled for the
round (not the number that replied: the denominator must not depend on any device's data), and
Gaussian noise of standard deviation z C / n is added to that mean. Adding or removing one device
moves the sum by at most C, so the release is a Gaussian mechanism with noise multiplier z, and
the accountant composes it round by round.

Sample counts are not used as weights: a device that claims many samples would otherwise weigh
more, and the sensitivity would no longer be C / n. The strategy receives the noisy mean as one
update (weight 1), so FedAvg, FedAdam, FedYogi and lora-svd process it as post-processing.

The noise comes from numpy's Generator seeded with (config seed, round): a run can be repeated
bit for bit, and a resumed run draws the same noise as one that never stopped. Whoever knows the
seed can regenerate the noise and remove it: see docs/SECURITY.md.
"""

from __future__ import annotations

import numpy as np

from edgeftl.coordinator.rounds.privacy.accountant import RdpAccountant
from edgeftl.coordinator.rounds.strategy.base import Update
from edgeftl.coordinator.rounds.strategy.guard import clip_l2

# Strategies that use only the (weighted) mean of the updates, so that one noisy mean can stand in
# for them. Robust aggregators (median, trimmed mean, Krum) look at individual updates, which is
# exactly what DP hides: they are refused with --dp-noise.
DP_STRATEGIES = ("fedavg", "fedadam", "fedyogi", "lora-svd")
_NOISE_STREAM = 0x0D9  # keeps the noise stream apart from the device sampling's generator


def gaussian_mean(deltas: list[np.ndarray], clip_norm: float, noise: float, denominator: int,
                  rng: np.random.Generator) -> np.ndarray:
    """(sum of the deltas clipped to clip_norm + N(0, (noise * clip_norm)^2 I)) / denominator.

    Args:
        deltas: float32 (size,) each; may be fewer than `denominator` (devices that did not reply).
        clip_norm: C > 0, the L2 bound on each device's contribution.
        noise: the noise multiplier z >= 0.
        denominator: n >= len(deltas), fixed before any update arrived.
        rng: the generator the noise is drawn from.

    Returns:
        float32 (size,): the noisy mean.
    """
    if not clip_norm > 0 or denominator < max(1, len(deltas)) or not deltas:
        raise ValueError(f"need clip_norm > 0, at least one delta and denominator >= {max(1, len(deltas))}, "
                         f"got clip_norm={clip_norm}, {len(deltas)} deltas, denominator={denominator}")
    total = np.zeros(deltas[0].shape, dtype=np.float64)
    for delta in deltas:
        total += clip_l2(delta, clip_norm)[0].astype(np.float64)
    return noisy_mean_of_sum(total, clip_norm, noise, denominator, rng)


def noisy_mean_of_sum(total: np.ndarray, clip_norm: float, noise: float, denominator: int,
                      rng: np.random.Generator) -> np.ndarray:
    """(total + N(0, (noise * clip_norm)^2 I)) / denominator, float32: gaussian_mean's release once
    the clipped deltas are summed (the streaming accumulator sums them as they arrive)."""
    noisy = total.astype(np.float64) + rng.normal(0.0, noise * clip_norm, size=total.shape)
    return (noisy / denominator).astype(np.float32)


class ClientDp:
    """The round loop's DP state: noise settings, the accountant, and what each record shows."""

    def __init__(self, clip_norm: float, noise: float, delta: float, seed: int) -> None:
        self.clip_norm, self.noise, self.delta, self.seed = clip_norm, noise, delta, seed
        self.accountant = RdpAccountant()
        self.unsampled = RdpAccountant()  # q = 1 every round: for anyone who sees which devices were sampled

    def noisy_mean(self, updates: list[Update], round_index: int, sampled: int, online: int) -> Update:
        """The round's one update for the strategy; composes the round into the accountant.

        Args:
            updates: the accepted updates (their weights are ignored: see the module docstring).
            round_index: seeds this round's noise.
            sampled: devices sampled for the round (the fixed denominator n).
            online: devices that could have been sampled; q = sampled / online.
        """
        mean = gaussian_mean([u.delta for u in updates], self.clip_norm, self.noise, sampled, self._rng(round_index))
        self._compose(sampled, online)
        return Update(mean, 1.0)

    def noisy_mean_of_sum(self, total: np.ndarray, count: int, round_index: int, sampled: int,
                          online: int) -> Update:
        """As noisy_mean, from the float64 sum of `count` deltas each already clipped to clip_norm
        (coordinator/rounds/accumulate.py StreamingMean): the same noise, the same release."""
        if not self.clip_norm > 0 or count < 1 or sampled < count:
            raise ValueError(f"need clip_norm > 0, at least one delta and denominator >= {max(1, count)}, "
                             f"got clip_norm={self.clip_norm}, {count} deltas, denominator={sampled}")
        mean = noisy_mean_of_sum(total, self.clip_norm, self.noise, sampled, self._rng(round_index))
        self._compose(sampled, online)
        return Update(mean, 1.0)

    def _rng(self, round_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, round_index, _NOISE_STREAM])

    def _compose(self, sampled: int, online: int) -> None:
        self.accountant.compose(sampled / max(online, sampled), self.noise)
        self.unsampled.compose(1.0, self.noise)

    def record(self) -> dict[str, float]:
        """The privacy spent so far, for the round record."""
        return {"dp_epsilon": self.accountant.epsilon(self.delta), "dp_delta": self.delta, "dp_noise": self.noise,
                "dp_clip_norm": self.clip_norm, "dp_epsilon_sampling_known": self.unsampled.epsilon(self.delta)}

    def state(self) -> dict[str, list[list[float]]]:
        """The composed rounds' (q, z), for the checkpoint's metadata."""
        return {"dp_rounds": [list(step) for step in self.accountant.history]}

    def load_state(self, meta: dict) -> None:
        """Recompose the rounds a checkpoint recorded (a resumed run keeps spending the same budget)."""
        for q, z in meta.get("dp_rounds", []):
            self.accountant.compose(float(q), float(z))
            self.unsampled.compose(1.0, float(z))


def epsilon_for(devices: int, sampled: int, noise: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` rounds sampling `sampled` of `devices` with noise z: a planning helper."""
    accountant = RdpAccountant()
    accountant.compose(sampled / devices, noise, rounds)
    return accountant.epsilon(delta)
