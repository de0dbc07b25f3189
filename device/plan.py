"""Estimate a training run's peak memory before it starts, by measuring it.

Peak RSS is monotonic within a process, so each probe is a fresh process (this module run with
`python -m`): it loads the bundle, runs one real training step (forward, backward, optimizer) on
synthetic inputs of the requested sequence length, and reports its resident memory after loading
and its peak. Probes run at micro-batches 1, 2 and the one asked for; between measured points
the estimate is the straight line through them, beyond the largest the last segment's slope:

    peak(M) ~= peak(a) + (M - a) * (peak(b) - peak(a)) / (b - a)    for measured a <= M <= b

Peak memory grows a little faster than linearly with the micro-batch (MiniLM int8, 128 tokens:
+13 MiB from 1 to 2 samples, +15 per sample from 8 to 16), so a line from 1 and 2 alone fell 5%
short at 16 (332 vs 351 MiB); interpolating below a measured point errs high, the safe side. A
probe that fails (the kernel killing it for memory, typically) marks its micro-batch as not
fitting. The estimate is a guide to be checked against `device train`'s measured
`peak_rss_mib`, not a guarantee. Nothing is saved: the probe's trained weights die with its
process.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


class MemoryLimitError(ValueError):
    """Even the smallest micro-batch does not fit the memory limit."""


@dataclass
class Probe:
    """One probe's measurement, MiB."""

    micro_batch: int
    seq: int
    rss_after_load_mib: float
    peak_rss_mib: float


@dataclass
class MemoryPlan:
    """Measured peaks at a few micro-batches of one sequence length, and lines between them."""

    seq: int
    rss_after_load_mib: float
    peaks_mib: dict[int, float]  # micro-batch -> measured peak RSS
    fails_from: int | None = None  # smallest micro-batch whose probe failed (does not fit)
    skipped_from: int | None = None  # not probed: estimated over the memory limit already

    def __post_init__(self) -> None:
        if not self.peaks_mib:
            raise ValueError("a memory plan needs at least one measured micro-batch")
        self.peaks_mib = dict(sorted(self.peaks_mib.items()))

    def _envelope(self) -> list[tuple[int, float]]:
        """Measured points, each peak raised to the largest at or below its micro-batch: a lower
        reading at a larger micro-batch is noise (page granularity, arena reuse), not savings."""
        points, highest = [], 0.0
        for micro_batch, peak in self.peaks_mib.items():
            highest = max(highest, peak)
            points.append((micro_batch, highest))
        return points

    @property
    def per_sample_mib(self) -> float:
        """Slope of the last measured segment, MiB per sample."""
        points = self._envelope()
        if len(points) < 2:
            return 0.0
        (a, peak_a), (b, peak_b) = points[-2], points[-1]
        return (peak_b - peak_a) / (b - a)

    def peak_mib(self, micro_batch: int) -> float:
        """Estimated peak RSS of training at this micro-batch, MiB."""
        points = self._envelope()
        for (a, peak_a), (b, peak_b) in itertools.pairwise(points):
            if micro_batch <= b:
                return round(peak_a + max(0, micro_batch - a) * (peak_b - peak_a) / (b - a), 1)
        last, peak_last = points[-1]
        return round(peak_last + max(0, micro_batch - last) * self.per_sample_mib, 1)

    def largest_fitting(self, limit_mib: float, batch: int) -> int:
        """Largest micro-batch in 1..batch whose estimated peak is within the limit; 0 if none."""
        ceiling = min(batch, self.fails_from - 1) if self.fails_from else batch
        return next((m for m in range(ceiling, 0, -1) if self.peak_mib(m) <= limit_mib), 0)

    def report(self, batch: int, micro_batch: int | None, limit_mib: float | None) -> dict:
        """Flat dict for the CLI: measured points, the estimate at the requested micro-batch, the fit."""
        micro = micro_batch or batch
        record = {"seq": self.seq, "rss_after_load_mib": self.rss_after_load_mib,
                  **{f"peak_{m}_mib": peak for m, peak in self.peaks_mib.items()},
                  "per_sample_mib": round(self.per_sample_mib, 2), "batch": batch, "micro_batch": micro,
                  "estimated_peak_mib": self.peak_mib(micro)}
        if self.fails_from:
            record["probe_failed_at_micro_batch"] = self.fails_from
        if self.skipped_from:
            record["probe_skipped_at_micro_batch"] = self.skipped_from
        if limit_mib is not None:
            record["max_memory_mib"] = limit_mib
            record["largest_fitting_micro_batch"] = self.largest_fitting(limit_mib, batch)
        return record


def fit_micro_batch(plan: MemoryPlan, batch: int, micro_batch: int | None, limit_mib: float,
                    extra_mib: float = 0.0) -> tuple[int, str | None]:
    """The micro-batch to train with under `limit_mib`, and an info line if it had to shrink.

    Args:
        extra_mib: resident memory the training process holds beyond a probe (its data), added
            to every estimate.

    Raises:
        MemoryLimitError: if even micro-batch 1 is estimated above the limit.
    """
    wanted = micro_batch or batch
    fits = plan.largest_fitting(limit_mib - extra_mib, batch)

    def peak(micro: int) -> float:
        return round(plan.peak_mib(micro) + extra_mib, 1)

    if fits == 0:
        raise MemoryLimitError(
            f"estimated peak memory {peak(1)} MiB at micro-batch 1 (sequence {plan.seq}) exceeds "
            f"--max-memory-mib {limit_mib:g}; rebuild the bundle with fewer trainable blocks "
            "(edgeftl build --train-layers) or a shorter --max-seq-len")
    if fits >= wanted:
        return wanted, None
    return fits, (f"micro-batch {fits} (estimated peak {peak(fits)} MiB) instead of {wanted} "
                  f"({peak(wanted)} MiB) to fit --max-memory-mib {limit_mib:g}; same optimizer steps")


def probe(bundle: Path, micro_batch: int, seq: int, threads: int | None = None) -> Probe:
    """Measure one training step in a fresh process.

    Raises:
        RuntimeError: if the probe process fails (its last error line is included).
    """
    cmd = [sys.executable, "-m", "edgeftl.device.plan", str(bundle), str(micro_batch), str(seq), str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe (micro-batch {micro_batch}, sequence {seq}) failed: {last}")
    return Probe(**json.loads(proc.stdout.strip().splitlines()[-1]))


def measure_plan(bundle: Path, seq: int, threads: int | None = None,
                 run_probe: Callable[..., Probe] | None = None, micro_batch: int = 2,
                 limit_mib: float | None = None) -> MemoryPlan:
    """Probe micro-batches 1, 2 and `micro_batch` at sequence length `seq` (fresh processes, or `run_probe`).

    With `limit_mib`, a micro-batch whose estimate from the smaller probes is already over the limit
    is not probed (`skipped_from`): the line from 1 and 2 errs low, so it would not fit either, and
    a probe past a board's memory thrashes for minutes and can make the kernel kill other processes.

    Raises:
        RuntimeError: if even the micro-batch 1 probe fails.
    """
    run_probe = run_probe or probe
    first = run_probe(bundle, 1, seq, threads)
    peaks, fails_from, skipped_from = {1: first.peak_rss_mib}, None, None
    for m in sorted({2, micro_batch} - {1}):
        estimate = MemoryPlan(seq, first.rss_after_load_mib, dict(peaks)).peak_mib(m)
        if limit_mib is not None and len(peaks) > 1 and estimate > limit_mib:
            skipped_from = m
            break
        try:
            peaks[m] = run_probe(bundle, m, seq, threads).peak_rss_mib
        except RuntimeError:  # most often killed for memory: this micro-batch does not fit here
            fails_from = m
            break
    return MemoryPlan(seq=seq, rss_after_load_mib=first.rss_after_load_mib, peaks_mib=peaks, fails_from=fails_from,
                      skipped_from=skipped_from)


def _probe_main(argv: list[str]) -> int:
    """Child process: load, one synthetic training step, print the Probe as JSON."""
    import numpy as np

    from edgeftl.device.measure import peak_rss_mib, rss_mib
    from edgeftl.device.protocol.manifest import CLASSIFY
    from edgeftl.device.runtime import BundleRuntime

    bundle, micro_batch, seq, threads = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    runtime = BundleRuntime(bundle, threads=threads or None, verify=False)  # the caller verified it
    after_load = rss_mib()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, runtime.tokenizer.get_vocab_size(), size=(micro_batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    # Like training: a split bundle's lower stack runs one example at a time (device/cache.py).
    features = np.concatenate([runtime.features(ids[i:i + 1], mask[i:i + 1]) for i in range(micro_batch)])
    labels = [runtime.manifest.labels[0]] * micro_batch if runtime.manifest.task == CLASSIFY else None
    runtime.accumulate(features, mask, runtime.targets(ids, mask, labels))
    runtime.apply_step()
    print(json.dumps(asdict(Probe(micro_batch, seq, after_load, max(after_load, peak_rss_mib())))))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
