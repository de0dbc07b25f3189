"""BuildConfig: every `edgeftl build` flag, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeftl.device.protocol.manifest import ADAPTERS, CAUSAL_LM, CLASSIFY, HEAD, LORA, QUANT_SCHEMES, TASKS

SEQ_LEN_RANGE = (8, 8192)  # accepted --max-seq-len: tokens per sample


class BuildError(ValueError):
    """Bad build input; the message names the value and what is accepted."""


@dataclass
class BuildConfig:
    """What to build. `targets=()` means the family's attention projections."""

    out: Path
    model: Path | None = None  # None = packaged all-MiniLM-L6-v2
    task: str = CLASSIFY
    labels: tuple[str, ...] = ()
    num_labels: int | None = None
    adapter: str = LORA
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    train_layers: int | None = None  # None = all blocks
    quant: str = "int8"
    block_size: int = 32
    int8_top_blocks: int = 2  # int4 only: the top N blocks' linear weights stay int8
    max_seq_len: int = 128
    recompute_attention: bool = True  # attention probabilities recomputed in the backward pass
    seed: int = 0
    force: bool = False
    model_id: str | None = None
    # Where to keep ONNX Runtime Training's own artifacts (graphs with training-only ops, AdamW
    # graph, checkpoint): what the benchmarks and equivalence tests run on the training build.
    reference_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.model = Path(self.model) if self.model is not None else None
        self.reference_dir = Path(self.reference_dir) if self.reference_dir is not None else None
        self.labels = tuple(self.labels)
        self.targets = tuple(self.targets)
        if self.task not in TASKS:
            raise BuildError(f"unknown task {self.task!r}; accepted: {', '.join(TASKS)}")
        if self.adapter not in ADAPTERS:
            raise BuildError(f"unknown adapter {self.adapter!r}; accepted: {', '.join(ADAPTERS)}")
        if self.quant not in QUANT_SCHEMES:
            raise BuildError(f"unknown quantization scheme {self.quant!r}; accepted: {', '.join(QUANT_SCHEMES)}")
        if self.rank <= 0:
            raise BuildError(f"--rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise BuildError(f"--alpha must be positive, got {self.alpha}")
        if self.block_size < 8 or self.block_size & (self.block_size - 1):
            raise BuildError(f"--block-size must be a power of two >= 8, got {self.block_size}")
        if self.int8_top_blocks < 0:
            raise BuildError(f"--int4-int8-top must be >= 0, got {self.int8_top_blocks}")
        low, high = SEQ_LEN_RANGE
        if not low <= self.max_seq_len <= high:
            raise BuildError(f"--max-seq-len must be in {low}..{high}, got {self.max_seq_len}")
        if self.train_layers is not None and self.train_layers <= 0:
            raise BuildError(f"--train-layers must be a positive integer, got {self.train_layers}")
        self._check_labels()
        if self.task == CAUSAL_LM and self.adapter == HEAD:
            raise BuildError("--adapter head needs --task classify; causal-lm trains LoRA adapters (--adapter lora)")
        if self.out.exists() and not self.force:
            raise BuildError(f"output folder {str(self.out)!r} already exists; pass --force to replace it")

    def _check_labels(self) -> None:
        if self.task != CLASSIFY:
            return
        if self.labels and self.num_labels is not None and self.num_labels != len(self.labels):
            raise BuildError(f"--num-labels {self.num_labels} disagrees with {len(self.labels)} --labels")
        if not self.labels and self.num_labels is None:
            raise BuildError("task classify needs --labels a,b,c or --num-labels N")
        if self.labels:
            if len(set(self.labels)) != len(self.labels) or any(not label for label in self.labels):
                raise BuildError(f"--labels must be distinct and non-empty, got {','.join(self.labels)!r}")
            if len(self.labels) < 2:
                raise BuildError(f"--labels needs at least 2 labels, got {','.join(self.labels)!r}")
        elif self.num_labels < 2:
            raise BuildError(f"--num-labels must be >= 2, got {self.num_labels}")
        else:
            self.labels = tuple(f"label_{i}" for i in range(self.num_labels))
