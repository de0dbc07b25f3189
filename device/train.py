"""Local training on a device: data file in, trained parameters and a measured summary out."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeftl.device.data import Example, read_examples
from edgeftl.device.runtime import BundleRuntime


@dataclass
class TrainConfig:
    """How long and how hard to train; exactly one of epochs / steps (default: 1 epoch)."""

    epochs: int | None = None
    steps: int | None = None
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    threads: int | None = None
    # Samples per forward/backward pass; a batch is run as ceil(batch / micro_batch) passes whose
    # weighted gradients add up to exactly the full batch's. Peak memory follows micro_batch.
    micro_batch: int | None = None
    grad_accum: int = 1  # batches per optimizer step

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give --epochs or --steps, not both")
        if self.epochs is None and self.steps is None:
            self.epochs = 1
        for name in ("epochs", "steps", "batch", "micro_batch", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def batches(examples: list[Example], size: int, rng: np.random.Generator):
    order = rng.permutation(len(examples))
    for start in range(0, len(order), size):
        yield [examples[i] for i in order[start:start + size]]


def prepare(runtime: BundleRuntime, batch: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, attention mask, targets) for one (micro-)batch."""
    ids, mask = runtime.encode([e.text for e in batch])
    targets = runtime.targets(ids, mask, [e.label for e in batch])
    return runtime.features(ids, mask), mask, targets


def _loss_units(runtime: BundleRuntime, targets: np.ndarray) -> int:
    # What the graph's loss averages over: samples (classify) or predicted tokens (causal-LM).
    if runtime.manifest.task == "classify":
        return len(targets)
    return int((targets[:, 1:] != -100).sum())


def accumulate_batch(runtime: BundleRuntime, batch: list[Example], micro_batch: int, share: float) -> float:
    """Forward/backward over `batch` in micro-batches, adding `share` x its mean-loss gradient.

    Each micro-batch's loss is weighted by its fraction of the batch's loss units, so the sum of
    the micro-batch gradients is the gradient of the batch's mean loss. Returns that mean loss.
    """
    parts = [prepare(runtime, batch[i:i + micro_batch]) for i in range(0, len(batch), micro_batch)]
    units = [_loss_units(runtime, targets) for _, _, targets in parts]
    total = max(1, sum(units))
    loss = 0.0
    for (feats, mask, targets), count in zip(parts, units):
        if count:
            loss += runtime.accumulate(feats, mask, targets, share * count / total) * count / total
    return loss


def run_batch(runtime: BundleRuntime, batch: list[Example], train: bool) -> tuple[float, np.ndarray, np.ndarray]:
    feats, mask, targets = prepare(runtime, batch)
    if train:
        return runtime.train_step(feats, mask, targets), targets, None
    loss, logits = runtime.eval_step(feats, mask, targets)
    return loss, targets, logits


def evaluate(runtime: BundleRuntime, examples: list[Example], batch: int) -> dict:
    """Mean loss (weighted by batch size) and, for classification, accuracy."""
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        loss, targets, logits = run_batch(runtime, chunk, train=False)
        total_loss += loss * len(chunk)
        count += len(chunk)
        if runtime.manifest.task == "classify":
            correct += int((logits.argmax(axis=-1) == targets).sum())
    result = {"eval_loss": round(total_loss / count, 5), "eval_samples": count}
    if runtime.manifest.task == "classify":
        result["eval_accuracy"] = round(correct / count, 5)
    return result


def train(runtime: BundleRuntime, examples: list[Example], config: TrainConfig,
          eval_examples: list[Example] | None = None, progress: bool = True) -> dict:
    """Train on examples; return a flat summary with units in the key names."""
    from tqdm import tqdm

    rng = np.random.default_rng(config.seed)
    runtime.set_learning_rate(config.lr)
    per_epoch = -(-len(examples) // config.batch)
    total = config.steps if config.steps is not None else per_epoch * config.epochs
    losses, step_times = [], []
    micro = config.micro_batch or config.batch
    with tqdm(total=total, desc="train", unit="step", disable=not progress) as bar:
        while len(losses) < total:
            for index, batch in enumerate(batches(examples, config.batch, rng)):
                start = time.perf_counter()
                losses.append(accumulate_batch(runtime, batch, micro, 1.0 / config.grad_accum))
                if (index + 1) % config.grad_accum == 0 or len(losses) >= total:
                    runtime.apply_step()
                step_times.append(time.perf_counter() - start)
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if len(losses) >= total:
                    break
    summary = {
        "steps": len(losses),
        "samples": min(len(losses) * config.batch, total * config.batch),
        "first_loss": round(losses[0], 5),
        "last_loss": round(losses[-1], 5),
        "median_step_time_s": round(statistics.median(step_times), 4),
        "samples_per_s": round(len(losses) * config.batch / sum(step_times), 2),
    }
    if eval_examples:
        summary.update(evaluate(runtime, eval_examples, config.batch))
    summary["peak_rss_mib"] = peak_rss_mib()
    return summary


def train_file(bundle: Path, data: Path, eval_file: Path | None, config: TrainConfig,
               progress: bool = True) -> dict:
    runtime = BundleRuntime(bundle, threads=config.threads)
    labels = runtime.manifest.labels or None
    examples = read_examples(data, runtime.manifest.task, labels)
    eval_examples = read_examples(eval_file, runtime.manifest.task, labels) if eval_file else None
    return train(runtime, examples, config, eval_examples, progress)
