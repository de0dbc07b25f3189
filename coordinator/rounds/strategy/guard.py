"""Guards applied to each accepted update before any strategy sees it: pure numpy.

Per-update L2 clipping bounds what one device can move the global by (the first defence against
a scaled update, and the sensitivity that client-level differential privacy needs). The weight
cap bounds how much one device's claimed sample count can count for: devices report `samples`
themselves and the coordinator cannot check it, so without a cap one device claiming 10**6
samples is the whole FedAvg average.
"""

from __future__ import annotations

import math

import numpy as np

from edgeftl.coordinator.rounds.strategy.base import Update

# A device may weigh at most this many times the round's median weight. Honest Dirichlet(0.5)
# splits of BBC News stay well under it (largest share 1.2-3.5x the median over seeds 0-5 with
# 5, 10 and 20 devices), so honest runs aggregate exactly as before; a device claiming 10**6
# samples counts as 10 medians.
DEFAULT_MAX_WEIGHT_RATIO = 10.0


def clip_l2(delta: np.ndarray, max_norm: float) -> tuple[np.ndarray, float]:
    """The delta scaled down to L2 norm <= max_norm (unchanged when already inside), and its norm before."""
    wide = delta.astype(np.float64).ravel()
    # einsum, not np.linalg.norm: BLAS wakes its threads for each dot, which cost 10x the sum itself
    # per update when hundreds of updates are clipped one by one between decodes on a busy 2-CPU machine.
    norm = math.sqrt(float(np.einsum("i,i->", wide, wide)))
    if max_norm <= 0 or norm <= max_norm:
        return delta, norm
    return (delta * np.float32(max_norm / norm)).astype(np.float32), norm


def clip_updates(updates: list[Update], max_norm: float) -> tuple[list[Update], list[float]]:
    """Every update clipped to max_norm (0 = no clipping), with the norms they arrived with."""
    clipped = [clip_l2(u.delta, max_norm) for u in updates]
    return [Update(delta, u.weight) for (delta, _), u in zip(clipped, updates)], [norm for _, norm in clipped]


def cap_weights(updates: list[Update], max_ratio: float) -> tuple[list[Update], int]:
    """Every weight capped at max_ratio x the median weight of these updates (0 = no cap), and how many were.

    The median is what a minority of devices cannot move: fewer than half of them inflating their
    sample counts leaves it among the honest counts.
    """
    if max_ratio <= 0 or not updates:
        return updates, 0
    cap = max_ratio * float(np.median([u.weight for u in updates]))
    capped = [Update(u.delta, min(u.weight, cap)) for u in updates]
    return capped, sum(u.weight > cap for u in updates)


def guard_updates(updates: list[Update], max_norm: float, max_weight_ratio: float) -> tuple[list[Update], dict]:
    """Clip every update to max_norm and cap every weight; returns the guarded updates and what was done.

    The report goes into the round record: `update_norm_max` and `update_norm_median` (L2 norms as
    received, before clipping), `updates_clipped` and `weights_capped` (counts).
    """
    clipped, norms = clip_updates(updates, max_norm)
    capped, weights_capped = cap_weights(clipped, max_weight_ratio)
    return capped, guard_report(norms, max_norm, weights_capped)


def guard_report(norms: list[float], max_norm: float, weights_capped: int) -> dict:
    """The guards' part of the round record, from the norms the updates arrived with (the streaming
    accumulator keeps only those, coordinator/rounds/accumulate.py)."""
    return {
        "update_norm_max": round(max(norms), 6) if norms else 0.0,
        "update_norm_median": round(float(np.median(norms)), 6) if norms else 0.0,
        "updates_clipped": sum(max_norm > 0 and n > max_norm for n in norms),
        "weights_capped": weights_capped,
    }
