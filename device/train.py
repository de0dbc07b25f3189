"""Local training on a device: data file in, trained parameters and a measured summary out."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeftl.device.data import DataError, Example, read_examples, split_indices
from edgeftl.device.files import append_jsonl
from edgeftl.device.measure import files_bytes, peak_rss_mib, rss_mib, run_metrics  # noqa: F401
from edgeftl.device.protocol.manifest import CLASSIFY, Manifest, sha256_file, verify_bundle
from edgeftl.device.runtime import IGNORE_INDEX, BundleRuntime
from edgeftl.device.state import Progress, StateError, check_settings, load_state, save_state

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # (features, attention mask, targets)
Inputs = Callable[[list[int]], Batch]  # example indices -> one padded micro-batch


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
    val_fraction: float | None = None  # share of the training file held out (seeded) for evaluation
    save_every: int | None = None  # batches between saves of the local state (with a state folder)
    max_memory_mib: float | None = None  # shrink micro_batch to fit this estimated peak, or refuse

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give --epochs or --steps, not both")
        if self.epochs is None and self.steps is None:
            self.epochs = 1
        for name in ("epochs", "steps", "batch", "micro_batch", "grad_accum", "save_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.save_every is not None and self.save_every % self.grad_accum:
            # A save between the batches of one optimizer step would lose the accumulated gradient.
            raise ValueError(f"--save-every {self.save_every} must be a multiple of --grad-accum {self.grad_accum}")
        if self.max_memory_mib is not None and not self.max_memory_mib > 0:
            raise ValueError(f"--max-memory-mib must be positive, got {self.max_memory_mib}")


def info(message: str) -> None:
    """One informational line on stderr (stdout is kept for the summary)."""
    print(f"edgeftl: {message}", file=sys.stderr)


# ---- inputs ---------------------------------------------------------------------------------


def prepare(runtime: BundleRuntime, batch: list[Example]) -> Batch:
    """(features, attention mask, targets) for one (micro-)batch, running the lower stack if any."""
    ids, mask = runtime.encode([e.text for e in batch])
    targets = runtime.targets(ids, mask, [e.label for e in batch])
    return runtime.features(ids, mask), mask, targets


def text_inputs(runtime: BundleRuntime, examples: Sequence[Example]) -> Inputs:
    """Inputs computed from the text on every use (no cache)."""
    return lambda indices: prepare(runtime, [examples[i] for i in indices])


def subset_inputs(inputs: Inputs, positions: Sequence[int] | np.ndarray) -> Inputs:
    """Inputs over a subset: index i means positions[i] of the underlying inputs."""
    return lambda indices: inputs([int(positions[i]) for i in indices])


# ---- steps ----------------------------------------------------------------------------------


def loss_units(runtime: BundleRuntime, targets: np.ndarray) -> int:
    # What the graph's loss averages over: samples (classify) or predicted tokens (causal-LM).
    if runtime.manifest.task == CLASSIFY:
        return len(targets)
    return int((targets[:, 1:] != IGNORE_INDEX).sum())


def loss_shares(units: list[int]) -> list[float]:
    """Each micro-batch's share of its batch's loss units: the `loss_weight` that makes the
    micro-batch gradients add up to the gradient of the whole batch's mean loss (docs/BUNDLE.md §3)."""
    total = max(1, sum(units))
    return [count / total for count in units]


def accumulate_parts(runtime, parts: list[Batch], share: float) -> float:
    """Forward/backward over one batch given as micro-batches, adding `share` x its mean-loss gradient.

    The one home of micro-batch accumulation (benchmarks and the build's probe plan use it too).
    Each micro-batch's loss is weighted by its `loss_shares`, so the sum of the micro-batch
    gradients is the gradient of the batch's mean loss. `runtime` is a `BundleRuntime` or anything
    with its `manifest`, `accumulate` (ONNX Runtime Training's reference runtime). Returns the
    batch's mean loss.
    """
    shares = loss_shares([loss_units(runtime, targets) for _, _, targets in parts])
    loss = 0.0
    for (feats, mask, targets), part in zip(parts, shares):
        if part:
            loss += runtime.accumulate(feats, mask, targets, share * part) * part
    return loss


def accumulate_batch(runtime: BundleRuntime, batch: list[Example], micro_batch: int, share: float) -> float:
    """`accumulate_parts` on examples, split into micro-batches of `micro_batch`."""
    parts = [prepare(runtime, batch[i:i + micro_batch]) for i in range(0, len(batch), micro_batch)]
    return accumulate_parts(runtime, parts, share)


def evaluate(runtime: BundleRuntime, examples: Sequence[Example], batch: int, inputs: Inputs | None = None) -> dict:
    """Mean loss over loss units (samples or predicted tokens) and accuracy (classify) or perplexity (causal-lm)."""
    inputs = inputs or text_inputs(runtime, examples)
    total_loss, total_units, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch):
        feats, mask, targets = inputs(list(range(start, min(start + batch, len(examples)))))
        loss, logits = runtime.eval_step(feats, mask, targets)
        units = loss_units(runtime, targets)
        total_loss, total_units = total_loss + loss * units, total_units + units
        if runtime.manifest.task == CLASSIFY:
            correct += int((logits.argmax(axis=-1) == targets).sum())
    mean = total_loss / max(1, total_units)
    result = {"eval_loss": round(mean, 5), "eval_samples": len(examples)}
    if runtime.manifest.task == CLASSIFY:
        result["eval_accuracy"] = round(correct / len(examples), 5)
    else:
        result["eval_perplexity"] = round(perplexity(mean), 4)
    return result


def perplexity(mean_token_loss: float) -> float:
    """exp of the mean cross-entropy per predicted token (nats); inf where that overflows a float."""
    return math.exp(mean_token_loss) if mean_token_loss < MAX_LOG_PERPLEXITY else math.inf


MAX_LOG_PERPLEXITY = 690.0  # exp(690) ~ 1e299: beyond it records drop the value as not a number


# ---- the loop -------------------------------------------------------------------------------


def _epoch_order(n: int, rng_state: dict) -> tuple[np.ndarray, dict]:
    """The epoch's shuffled order from the RNG position before it, and the position after it."""
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    order = rng.permutation(n)
    return order, rng.bit_generator.state


def train(runtime: BundleRuntime, examples: Sequence[Example], config: TrainConfig,
          eval_examples: Sequence[Example] | None = None, progress: bool = True, *,
          inputs: Inputs | None = None, eval_inputs: Inputs | None = None, resume: Progress | None = None,
          on_save: Callable[[Progress], object] | None = None, rss_after_load: float | None = None) -> dict:
    """Train on examples; return a flat summary with units in the key names.

    Args:
        inputs / eval_inputs: where micro-batches come from (default: tokenize and run the lower
            stack each time; see `device/cache.py` for the cached lower-stack outputs).
        resume: progress of a saved state; training continues at its step, epoch, batch and RNG position.
        on_save: called with the progress every `config.save_every` batches and at the end.
    """
    from tqdm import tqdm

    inputs = inputs or text_inputs(runtime, examples)
    loaded_bytes = files_bytes(runtime.loaded_files)  # now: a save may prune the checkpoint we started from
    runtime.set_learning_rate(config.lr)
    n, size, micro = len(examples), config.batch, config.micro_batch or config.batch
    per_epoch = -(-n // size)
    total = config.steps if config.steps is not None else per_epoch * (config.epochs or 1)
    pos = resume or Progress(epoch_rng=dict(np.random.default_rng(config.seed).bit_generator.state))
    if pos.step >= total:
        info(f"the saved state is at step {pos.step}, the target is {total}: nothing to train")
    losses, step_times, samples = [], [], 0
    with tqdm(total=total, initial=min(pos.step, total), desc="train", unit="step", disable=not progress) as bar:
        while pos.step < total:
            order, next_rng = _epoch_order(n, pos.epoch_rng)
            for start in range(pos.batch_in_epoch * size, n, size):
                began = time.perf_counter()
                batch = order[start:start + size].tolist()
                parts = [inputs(batch[i:i + micro]) for i in range(0, len(batch), micro)]
                losses.append(accumulate_parts(runtime, parts, 1.0 / config.grad_accum))
                pos.step, pos.batch_in_epoch, samples = pos.step + 1, pos.batch_in_epoch + 1, samples + len(batch)
                if pos.step % config.grad_accum == 0 or pos.step >= total:
                    runtime.apply_step()
                step_times.append(time.perf_counter() - began)
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if pos.batch_in_epoch == per_epoch:
                    pos = Progress(step=pos.step, epoch=pos.epoch + 1, batch_in_epoch=0, epoch_rng=next_rng)
                if on_save and config.save_every and pos.step % config.save_every == 0:
                    on_save(pos)
                if pos.step >= total:
                    break
    if on_save:
        on_save(pos)
    summary = _summary(losses, pos, samples, micro)
    if eval_examples:
        summary.update(evaluate(runtime, eval_examples, micro, eval_inputs))
    summary.update(run_metrics(step_times, samples, rss_after_load, loaded_bytes))
    return summary


def _summary(losses: list[float], pos: Progress, samples: int, micro: int) -> dict:
    return {
        "steps": len(losses),  # batches trained in this run
        "global_step": pos.step,  # over all runs of a saved state
        "epoch": pos.epoch,
        "samples": samples,
        "first_loss": round(losses[0], 5) if losses else None,
        "last_loss": round(losses[-1], 5) if losses else None,
        "micro_batch": micro,
    }


# ---- from files -----------------------------------------------------------------------------


def train_file(bundle: Path, data: Path, eval_file: Path | None, config: TrainConfig, progress: bool = True, *,
               state_dir: Path | None = None, cache_dir: Path | None = None, metrics: Path | None = None) -> dict:
    """Check everything, then train: the bundle, the data, the saved state, the memory limit.

    Every check that can fail runs before anything is written, so bad input leaves a saved
    state as it was. `cache_dir` None disables the lower-stack cache.
    """
    manifest = verify_bundle(bundle)
    examples = read_examples(data, manifest.task, manifest.labels or None)
    train_idx, val_idx, eval_examples = _split(examples, eval_file, manifest, config)
    settings = {"data_sha256": sha256_file(data), "seed": config.seed, "batch": config.batch,
                "grad_accum": config.grad_accum, "val_fraction": config.val_fraction}
    saved = load_state(state_dir, bundle) if state_dir else None
    if saved and state_dir:
        check_settings(saved, settings, state_dir)
    runtime = BundleRuntime(bundle, threads=config.threads, verify=False)
    if saved:
        try:
            runtime.set_flat(saved.params)
            runtime.load_optimizer_state(saved.optimizer)
        except ValueError as exc:
            raise StateError(f"state {str(state_dir)!r} does not fit this bundle ({exc}); "
                             "use another --state folder") from exc
    after_load = rss_mib()
    if config.max_memory_mib:
        config = _fit_memory(runtime, after_load, [examples[i].text for i in train_idx], config)
    if saved and saved.progress.step:
        info(f"resuming {state_dir} at step {saved.progress.step} (epoch {saved.progress.epoch})")
    all_inputs, eval_inputs, closers = _inputs(runtime, examples, data, eval_examples, eval_file, cache_dir, progress)
    try:
        summary = train(
            runtime, [examples[i] for i in train_idx], config,
            [examples[i] for i in val_idx] if val_idx is not None else eval_examples, progress,
            inputs=subset_inputs(all_inputs, train_idx),
            eval_inputs=subset_inputs(all_inputs, val_idx) if val_idx is not None else eval_inputs,
            resume=saved.progress if saved else None, rss_after_load=after_load,
            on_save=(lambda pos: save_state(state_dir, runtime, pos, settings)) if state_dir else None)
    finally:
        for close in closers:
            close()
    if metrics:
        append_jsonl(metrics, summary)
    return summary


def _split(examples: list[Example], eval_file: Path | None, manifest: Manifest,
           config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None, list[Example] | None]:
    """(training indices, validation indices or None, examples of the --eval file or None)."""
    everything = np.arange(len(examples))
    if config.val_fraction is None:
        eval_examples = read_examples(eval_file, manifest.task, manifest.labels or None) if eval_file else None
        return everything, None, eval_examples
    if eval_file:
        raise ValueError("give --eval or --val-fraction, not both")
    train_idx, val_idx = split_indices(len(examples), (1 - config.val_fraction, config.val_fraction), config.seed)
    if not len(train_idx) or not len(val_idx):
        raise DataError(f"--val-fraction {config.val_fraction} of {len(examples)} examples leaves "
                        f"{len(train_idx)} to train and {len(val_idx)} to validate; both need at least one")
    return train_idx, val_idx, None


def _inputs(runtime: BundleRuntime, examples: list[Example], data: Path, eval_examples: list[Example] | None,
            eval_file: Path | None, cache_dir: Path | None, progress: bool) -> tuple[Inputs, Inputs | None, list]:
    """Inputs for the training file and the --eval file, with the closers of their caches."""
    inputs, closers = data_inputs(runtime, examples, data, cache_dir, progress)
    eval_inputs = None
    if eval_examples and eval_file is not None:
        eval_inputs, eval_closers = data_inputs(runtime, eval_examples, eval_file, cache_dir, progress)
        closers += eval_closers
    return inputs, eval_inputs, closers


def data_inputs(runtime: BundleRuntime, examples: list[Example], data: Path, cache_dir: Path | None,
                progress: bool) -> tuple[Inputs, list]:
    """(inputs, closers) for one data file: the cached lower-stack outputs of a split bundle when
    `cache_dir` is given (computed on first use), else the text, tokenized on every use."""
    if runtime.lower is None or cache_dir is None:
        return text_inputs(runtime, examples), []
    from edgeftl.device.cache import open_or_build

    cache = open_or_build(runtime, examples, data, cache_dir, progress)
    return cache.inputs(runtime, examples), [cache.close]


def _fit_memory(runtime: BundleRuntime, after_load: float, texts: list[str], config: TrainConfig) -> TrainConfig:
    """Probe peak memory at the data's longest sequence and shrink the micro-batch to fit.

    The probes are bare processes; this one also holds the data, so what it holds beyond a
    probe after loading is added to every estimate (the limit is for this process).
    """
    from edgeftl.device.plan import fit_micro_batch, measure_plan

    seq = max(len(ids) for ids in runtime.token_ids(texts))
    plan = measure_plan(runtime.folder, seq, config.threads, micro_batch=config.micro_batch or config.batch,
                        limit_mib=config.max_memory_mib)
    extra = max(0.0, after_load - plan.rss_after_load_mib)
    limit = config.max_memory_mib
    assert limit is not None, "called only with --max-memory-mib"
    micro, note = fit_micro_batch(plan, config.batch, config.micro_batch, limit, extra)
    if note:
        info(note)
    return replace(config, micro_batch=micro)
