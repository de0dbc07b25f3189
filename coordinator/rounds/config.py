"""CoordinatorConfig: every `edgeftl coordinator` flag, validated before anything connects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeftl.coordinator.rounds.secure import STRATEGIES as SECURE_STRATEGIES
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
    max_step_norm: float = 0.0  # refuse a new global further than this (L2) from the last; 0 = unbounded
    secure_aggregation: bool = False  # masked updates, only their sum is unmasked (docs/SECAGG.md)
    seed: int = 0
    run_id: str = ""  # "" = a fresh id per run (resume keeps the checkpoint's)
    prefix: str = "edgeftl"
    resume: bool = False  # continue after the checkpoint in `out`
    force: bool = False  # replace the run already in `out` (without it, a non-empty `out` is refused)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("rounds", "min_updates", "batch", "wait_devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.resume and self.force:
            raise ValueError("give --resume to continue the run in --out or --force to replace it, not both")
        if self.devices_per_round < 0:
            raise ValueError(f"--devices-per-round must be >= 0, got {self.devices_per_round}")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give --epochs or --steps for local training, not both")
        if self.epochs is None and self.steps is None:
            self.steps = DEFAULT_STEPS
        for name in ("clip_norm", "max_step_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not self.deadline_s > 0 or not self.lr > 0:
            raise ValueError("--deadline-s and --lr must be positive")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; accepted: {', '.join(STRATEGIES)}")
        if self.secure_aggregation and (self.strategy not in SECURE_STRATEGIES or self.clip_norm):
            raise ValueError(f"--secure-aggregation needs a strategy of {', '.join(SECURE_STRATEGIES)} and no "
                             f"--clip-norm (the coordinator sees only the sum), got {self.strategy!r}, "
                             f"clip norm {self.clip_norm}")
        if not self.run_id:
            import uuid

            self.run_id = f"run-{uuid.uuid4().hex[:12]}"
        self.codec = parse_codec(self.codec).spec  # raises CodecError (a ValueError) naming the forms
        self.downlink = parse_codec(self.downlink).spec
