"""Cost to reach an accuracy: rounds, upload and download bytes until the global model first scores
at least a target.

What users of an edge federation pay for is bandwidth and device time until the model is good
enough, not the size of one message: a codec that sends 50x fewer bytes per round but needs 3x
the rounds saves 17x, not 50x. Recent edge-FL benchmarks report "bytes to target accuracy"
for that reason. Pure functions of metrics.jsonl records (one per round, in round order).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reached:
    """The first round whose held-out accuracy met a target, and what the run had spent by then.

    `rounds` counts rounds, not the index: a target met after round 0 took 1 round. Bytes are
    cumulative over those rounds (round 0's downlink includes each device's first full sync).
    """

    target: float
    rounds: int
    accuracy: float
    bytes_up: int
    bytes_down: int


def accuracies(records: list[dict]) -> list[float | None]:
    """Each record's held-out accuracy, None where the round was not evaluated."""
    return [r["accuracy"] if isinstance(r.get("accuracy"), (int, float)) else None for r in records]


def reach(records: list[dict], target: float) -> Reached | None:
    """Rounds and cumulative bytes until the first evaluated round with accuracy >= target.

    Args:
        records: metrics.jsonl records in round order, with bytes_up / bytes_down per round.
        target: an accuracy in [0, 1].

    Returns:
        None when no round reached the target.
    """
    bytes_up = bytes_down = 0
    for count, (record, accuracy) in enumerate(zip(records, accuracies(records)), start=1):
        bytes_up += int(record.get("bytes_up", 0) or 0)
        bytes_down += int(record.get("bytes_down", 0) or 0)
        if accuracy is not None and accuracy >= target:
            return Reached(target, count, accuracy, bytes_up, bytes_down)
    return None


def final_accuracy(records: list[dict]) -> float | None:
    """The last evaluated round's accuracy."""
    evaluated = [a for a in accuracies(records) if a is not None]
    return evaluated[-1] if evaluated else None


def reference_target(reference: list[dict], slack_points: float = 1.0) -> float | None:
    """The reference run's final accuracy minus `slack_points` percentage points (issue 16's target:
    fp32 FedAvg's final accuracy minus 1 point)."""
    final = final_accuracy(reference)
    return None if final is None else final - slack_points / 100


def ratio(reference: float | int | None, other: float | int | None) -> float | None:
    """reference / other, None when either is missing or other is zero (`12.3x fewer`)."""
    if reference is None or other is None or other == 0:
        return None
    return reference / other


def curve(records: list[dict], direction: str = "bytes_up", key: str = "accuracy") -> list[tuple[int, float]]:
    """(cumulative bytes in `direction` after the round, the round's `key` score) for each scored round.

    Args:
        records: metrics.jsonl records in round order.
        direction: "bytes_up" (devices to coordinator) or "bytes_down" (to the devices).
        key: "accuracy", or "perplexity" for a language model.
    """
    sent, points = 0, []
    for record in records:
        sent += int(record.get(direction, 0) or 0)
        score = record.get(key)
        if isinstance(score, (int, float)):
            points.append((sent, float(score)))
    return points
