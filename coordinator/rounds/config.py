"""CoordinatorConfig: every `edgeftl coordinator` flag, validated before anything connects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeftl.coordinator.rounds.privacy.mechanism import DP_STRATEGIES
from edgeftl.coordinator.rounds.strategy import STRATEGIES
from edgeftl.device.protocol.codecs import parse_codec

DEFAULT_STEPS = 10


@dataclass
class CoordinatorConfig:
    """How the federation runs; one field per CLI flag."""

    out: Path
    rounds: int = 20
    devices_per_round: int = 0  # 0 = every online device
    min_updates: int = 1
    deadline_s: float = 120.0
    wait_devices: int = 1  # online devices needed before round 0 starts
    wait_devices_s: float = 60.0
    epochs: int | None = None
    steps: int | None = None  # None with no epochs: DEFAULT_STEPS
    batch: int = 16
    lr: float = 1e-3
    codec: str = "none"  # uplink
    downlink: str = "none"  # codec of the per-round global delta
    strategy: str = "fedavg"
    server_lr: float | None = None
    clip_norm: float = 0.0  # per-update L2 clip before aggregation; 0 = none
    dp_noise: float = 0.0  # client-level DP noise multiplier z (std z * clip_norm / n); 0 = no DP
    dp_delta: float = 1e-5  # the delta epsilon is reported at
    seed: int = 0
    run_id: str = ""  # "" = a fresh id per run (resume keeps the checkpoint's)
    prefix: str = "edgeftl"
    resume: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("rounds", "min_updates", "batch", "wait_devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.devices_per_round < 0:
            raise ValueError(f"--devices-per-round must be >= 0, got {self.devices_per_round}")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give --epochs or --steps for local training, not both")
        if self.epochs is None and self.steps is None:
            self.steps = DEFAULT_STEPS
        if not self.clip_norm >= 0:
            raise ValueError(f"--clip-norm must be >= 0 (0 = no clipping), got {self.clip_norm}")
        if not self.deadline_s > 0 or not self.lr > 0:
            raise ValueError("--deadline-s and --lr must be positive")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; accepted: {', '.join(STRATEGIES)}")
        self._check_dp()
        if not self.run_id:
            import uuid

            self.run_id = f"run-{uuid.uuid4().hex[:12]}"
        self.codec = parse_codec(self.codec).spec  # raises CodecError (a ValueError) naming the forms
        self.downlink = parse_codec(self.downlink).spec

    def _check_dp(self) -> None:
        if not (0 <= self.dp_noise < float("inf")):
            raise ValueError(f"--dp-noise must be a finite number >= 0 (0 = no DP), got {self.dp_noise}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_noise > 0 and not self.clip_norm > 0:
            raise ValueError("--dp-noise needs --clip-norm > 0: the noise is scaled to the clip norm, "
                             "and an unclipped update has no bound")
        if self.dp_noise > 0 and self.strategy not in DP_STRATEGIES:
            raise ValueError(f"--dp-noise works with {', '.join(DP_STRATEGIES)}, not {self.strategy!r}: "
                             "the strategy sees one noisy mean, never the individual updates")
