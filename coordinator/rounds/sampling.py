"""Who is online, and which of them a round samples: constant work per status, a fleet of any size.

`OnlineDevices` is kept current by the status topics (birth, will, clean offline): a set of the
online ids, a set of those that went offline, and per registered device when its last status came
and the memory its card reports. Counting is O(1); only sampling walks the online ids (once per
round, sorted, so that a seed gives the same sample whatever order the statuses came in).

Sampling modes (`--sample`):

- `uniform`: every online device equally likely (the sample every earlier run drew, seed for seed).
- `memory`: probability proportional to the memory the device reports free (`mem_available_mib` in
  its status card, docs/PROTOCOL.md section 6.4); a device that reports none weighs as the median of
  those that do. Devices with room to spare train larger batches and are killed less often.
- `fair`: least recently sampled first (never-sampled devices before all others), ties drawn at
  random: over a run every online device takes part about equally often, which uniform sampling
  of a few hundred from 10,000 does not promise. It remembers each device's last sampled round,
  which the checkpoint keeps.

Every draw comes from the coordinator's generator, seeded by `--seed` and checkpointed, so a resumed
run samples as one that never stopped.
"""

from __future__ import annotations

import time

import numpy as np

from edgeftl.device.protocol.messages import Status

SAMPLE_MODES = ("uniform", "memory", "fair")
MEMORY_KEY = "mem_available_mib"  # the card key `memory` sampling reads


def check_sample_mode(mode: str) -> str:
    """mode itself, or ValueError naming the accepted modes."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"--sample must be one of {', '.join(SAMPLE_MODES)}, got {mode!r}")
    return mode


class OnlineDevices:
    """The registered devices as their retained statuses describe them."""

    def __init__(self) -> None:
        self.online: set[str] = set()
        self.offline: set[str] = set()  # registered and gone (will or clean offline)
        self.last_seen: dict[str, float] = {}  # device -> time.monotonic() of its last status
        self.memory_mib: dict[str, float] = {}  # device -> MEMORY_KEY from its last card that had it

    @property
    def count(self) -> int:
        return len(self.online)

    def note(self, status: Status) -> None:
        """One status: O(1) whatever the fleet's size."""
        device = status.device_id
        (self.online if status.online else self.offline).add(device)
        (self.offline if status.online else self.online).discard(device)
        self.last_seen[device] = time.monotonic()
        memory = status.info.get(MEMORY_KEY) if status.info else None
        if isinstance(memory, (int, float)) and memory >= 0:
            self.memory_mib[device] = float(memory)

    def is_online(self, device: str) -> bool:
        return device in self.online


class Sampler:
    """Draws each round's devices from the online ones with the coordinator's generator."""

    def __init__(self, mode: str, rng: np.random.Generator) -> None:
        self.mode, self.rng = check_sample_mode(mode), rng
        self.last_sampled: dict[str, int] = {}  # device -> the last round it was sampled for (`fair`)

    def sample(self, devices: OnlineDevices, count: int, round_index: int) -> list[str]:
        """`count` online devices (every one when count is 0 or they are fewer), sorted."""
        online = sorted(devices.online)
        count = count or len(online)
        if len(online) <= count:
            chosen = online
        elif self.mode == "memory":
            chosen = self.rng.choice(online, size=count, replace=False, p=_memory_weights(online, devices)).tolist()
        elif self.mode == "fair":
            chosen = self._least_recent(online, count)
        else:
            chosen = self.rng.choice(online, size=count, replace=False).tolist()
        self.note_sampled(chosen, round_index)
        return sorted(chosen)

    def _least_recent(self, online: list[str], count: int) -> list[str]:
        order = self.rng.permutation(len(online))  # the tie-break: random among equally recent
        last = np.array([self.last_sampled.get(online[i], -1) for i in order])
        return [online[i] for i in order[np.argsort(last, kind="stable")[:count]]]

    def note_sampled(self, chosen: list[str], round_index: int) -> None:
        """Remember the round these devices were sampled for (also for a round a resume reopened)."""
        if self.mode == "fair":
            self.last_sampled.update(dict.fromkeys(chosen, round_index))

    def state(self) -> dict:
        """For the checkpoint's metadata (the generator's state is saved beside it)."""
        return {"sample_mode": self.mode, "last_sampled": dict(self.last_sampled)}

    def load_state(self, meta: dict) -> None:
        """Restore what state() saved; a checkpoint from before sampling modes has none of it."""
        last = meta.get("last_sampled", {})
        if not isinstance(last, dict):
            raise ValueError("last_sampled is not a device -> round table")
        self.last_sampled = {str(device): int(round_index) for device, round_index in last.items()}


def _memory_weights(online: list[str], devices: OnlineDevices) -> np.ndarray:
    """Sampling probabilities proportional to reported free memory (at least 1 MiB each, so every
    online device stays possible); devices that report none weigh as the median of those that do."""
    known = [devices.memory_mib[d] for d in online if d in devices.memory_mib]
    fallback = float(np.median(known)) if known else 1.0
    weights = np.array([max(devices.memory_mib.get(d, fallback), 1.0) for d in online], dtype=np.float64)
    return weights / weights.sum()
