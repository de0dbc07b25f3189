"""CoordinatorConfig: every `edgeftl coordinator` flag, validated before anything connects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeftl.coordinator.rounds.privacy.mechanism import DP_STRATEGIES
from edgeftl.coordinator.rounds.sampling import check_sample_mode
from edgeftl.coordinator.rounds.secure import STRATEGIES as SECURE_STRATEGIES
from edgeftl.coordinator.rounds.strategy import KRUM_STRATEGIES, STRATEGIES
from edgeftl.coordinator.rounds.strategy.guard import DEFAULT_MAX_WEIGHT_RATIO
from edgeftl.coordinator.rounds.strategy.trimmed import check_trim_fraction
from edgeftl.device.protocol.codecs import parse_codec
from edgeftl.device.protocol.wire import COMPACT_VERSION, VERSIONS

DEFAULT_STEPS = 10
MODES = ("sync", "async")


@dataclass
class CoordinatorConfig:
    """How the federation runs; one field per CLI flag."""

    out: Path
    rounds: int = 20
    devices_per_round: int = 0  # 0 = every online device
    sample: str = "uniform"  # how the devices_per_round are drawn (sampling.SAMPLE_MODES)
    min_updates: int = 1
    deadline_s: float = 120.0
    wait_devices: int = 1  # online devices needed before round 0 starts
    wait_devices_s: float = 60.0
    epochs: int | None = None
    steps: int | None = None  # None with no epochs: DEFAULT_STEPS
    batch: int = 16
    lr: float = 1e-3
    lr_final: float = 0.0  # the last round's lr; rounds between decay geometrically from lr; 0 = lr throughout
    codec: str = "none"  # uplink
    downlink: str = "none"  # codec of the per-round global delta
    strategy: str = "fedavg"
    server_lr: float | None = None
    clip_norm: float = 0.0  # per-update L2 clip before aggregation; 0 = none
    max_step_norm: float = 0.0  # refuse a new global further than this (L2) from the last; 0 = unbounded
    secure_aggregation: bool = False  # masked updates, only their sum is unmasked (docs/SECAGG.md)
    max_weight_ratio: float = DEFAULT_MAX_WEIGHT_RATIO  # cap on a weight, x the round's median; 0 = none
    trim_fraction: float = 0.1  # trimmed-mean: share dropped from each side per coordinate
    byzantine: int = 0  # f, the attackers krum and multi-krum tolerate
    krum_select: int = 0  # updates multi-krum averages; 0 = n - f
    dp_noise: float = 0.0  # client-level DP noise multiplier z (std z * clip_norm / n); 0 = no DP
    dp_delta: float = 1e-5  # the delta epsilon is reported at
    seed: int = 0
    run_id: str = ""  # "" = a fresh id per run (resume keeps the checkpoint's)
    prefix: str = "edgeftl"
    resume: bool = False  # continue after the checkpoint in `out`
    force: bool = False  # replace the run already in `out` (without it, a non-empty `out` is refused)
    mode: str = "sync"  # sync rounds, or async buffered aggregation (FedBuff: coordinator/rounds/fedbuff.py)
    buffer: int = 10  # async: updates aggregated into each new global version
    max_staleness: int = 10  # async: refuse updates trained on a version older than current - this
    framing: int = COMPACT_VERSION  # the newest message version tasks say devices may reply in (PROTOCOL 4.2)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("rounds", "min_updates", "batch", "wait_devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.resume and self.force:
            raise ValueError("give --resume to continue the run in --out or --force to replace it, not both")
        if self.devices_per_round < 0:
            raise ValueError(f"--devices-per-round must be >= 0, got {self.devices_per_round}")
        check_sample_mode(self.sample)
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give --epochs or --steps for local training, not both")
        if self.epochs is None and self.steps is None:
            self.steps = DEFAULT_STEPS
        for name in ("clip_norm", "max_step_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(self, name)}")
        self._check_robust()
        if not self.deadline_s > 0 or not self.lr > 0:
            raise ValueError("--deadline-s and --lr must be positive")
        if self.framing not in VERSIONS:
            raise ValueError(f"--framing must be one of {', '.join(map(str, VERSIONS))} (message versions), "
                             f"got {self.framing}")
        if not self.lr_final >= 0:
            raise ValueError(f"--lr-final must be >= 0 (0 = --lr in every round), got {self.lr_final}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; accepted: {', '.join(STRATEGIES)}")
        if self.secure_aggregation and (self.strategy not in SECURE_STRATEGIES or self.clip_norm):
            raise ValueError(f"--secure-aggregation needs a strategy of {', '.join(SECURE_STRATEGIES)} and no "
                             f"--clip-norm (the coordinator sees only the sum), got {self.strategy!r}, "
                             f"clip norm {self.clip_norm}")
        self._check_dp()
        self._check_async()
        if not self.run_id:
            import uuid

            self.run_id = f"run-{uuid.uuid4().hex[:12]}"
        self.codec = parse_codec(self.codec).spec  # raises CodecError (a ValueError) naming the forms
        self.downlink = parse_codec(self.downlink).spec

    def round_lr(self, round_index: int) -> float:
        """The local learning rate a round's task names: lr, decaying geometrically to lr_final at the last round.

        A schedule the coordinator owns: devices train with the task's lr, so older devices follow it.
        """
        if not self.lr_final or self.rounds < 2:
            return self.lr
        step = min(max(round_index, 0), self.rounds - 1) / (self.rounds - 1)
        return self.lr * (self.lr_final / self.lr) ** step

    def _check_robust(self) -> None:
        """The weight cap and the robust aggregators' parameters."""
        if not self.max_weight_ratio == 0 and not self.max_weight_ratio >= 1:
            raise ValueError(f"--max-weight-ratio must be 0 (no cap) or >= 1 (x the round's median weight), "
                             f"got {self.max_weight_ratio}")
        check_trim_fraction(self.trim_fraction)
        if self.byzantine < 0 or self.krum_select < 0:
            raise ValueError(f"--byzantine and --krum-select must be >= 0, got {self.byzantine} and {self.krum_select}")
        if self.strategy not in KRUM_STRATEGIES:
            return
        if self.byzantine < 1:
            raise ValueError(f"--strategy {self.strategy} needs --byzantine f >= 1, the attackers to tolerate")
        if 0 < self.devices_per_round <= 2 * self.byzantine + 2:
            raise ValueError(f"--strategy {self.strategy} with --byzantine {self.byzantine} needs more than "
                             f"{2 * self.byzantine + 2} updates a round (n > 2f + 2); "
                             f"--devices-per-round is {self.devices_per_round}")
        if self.krum_select and self.devices_per_round and self.krum_select > self.devices_per_round:
            raise ValueError(f"--krum-select {self.krum_select} exceeds --devices-per-round {self.devices_per_round}")

    def _check_async(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown --mode {self.mode!r}; accepted: {', '.join(MODES)}")
        if self.buffer < 1 or self.max_staleness < 0:
            raise ValueError(f"--buffer must be >= 1 and --max-staleness >= 0, got {self.buffer} and "
                             f"{self.max_staleness}")
        if self.mode != "async":
            return
        if self.secure_aggregation:
            raise ValueError("--mode async cannot use --secure-aggregation: masks cancel only in the sum of one "
                             "round's fixed roster, and a FedBuff buffer mixes devices trained on different versions")
        if self.dp_noise > 0:
            raise ValueError("--mode async cannot use --dp-noise: the privacy accountant assumes sampled rounds, "
                             "not a buffer of updates from different versions")
        if self.resume:
            raise ValueError("--mode async cannot --resume: the devices training on older versions are not "
                             "checkpointed; start over with --force")
        if self.devices_per_round and self.buffer > self.devices_per_round:
            raise ValueError(f"--buffer {self.buffer} exceeds --devices-per-round {self.devices_per_round}: at most "
                             "that many devices train at a time, so a version could never collect its buffer")

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
