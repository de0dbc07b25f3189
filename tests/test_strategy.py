"""Aggregation strategies against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from edgeftl.coordinator.rounds.strategy import FedAdam, FedAvg, FedYogi, LoraAware, Update, make_strategy
from edgeftl.device.protocol.manifest import LoraFactor, TrainableParam


def test_fedavg_is_the_sample_weighted_mean():
    # Prepare: global 0; device deltas 1 (3 samples) and 5 (1 sample) -> (3*1 + 1*5) / 4 = 2
    g = np.zeros(2, np.float32)
    updates = [Update(np.array([1, 0], np.float32), 3), Update(np.array([5, 4], np.float32), 1)]
    # Execute / Assert
    np.testing.assert_allclose(FedAvg().aggregate(g, updates), [2.0, 1.0])
    np.testing.assert_allclose(FedAvg(server_lr=0.5).aggregate(g + 1, updates), [2.0, 1.5])


def test_fedavg_rejects_empty_and_bad_weights():
    with pytest.raises(ValueError, match="zero updates"):
        FedAvg().aggregate(np.zeros(1, np.float32), [])
    with pytest.raises(ValueError, match="positive"):
        FedAvg().aggregate(np.zeros(1, np.float32), [Update(np.ones(1, np.float32), 0)])


def test_fedadam_first_step_by_hand():
    # d = 0.1; m = 0.1 * 0.1 = 0.01; v = 0.99 * tau^2 + 0.01 * 0.01 = 9.9e-7 + 1e-4
    # step = lr * m / (sqrt(v) + tau)
    lr, tau = 0.1, 1e-3
    strategy = FedAdam(server_lr=lr, tau=tau)
    out = strategy.aggregate(np.zeros(1, np.float32), [Update(np.array([0.1], np.float32), 1)])
    v = 0.99 * tau**2 + 0.01 * 0.01
    assert out[0] == pytest.approx(lr * 0.01 / (np.sqrt(v) + tau), rel=1e-5)
    assert set(strategy.state()) == {"m", "v"}


def test_fedyogi_second_moment_differs_from_adam_and_state_round_trips():
    d = [Update(np.array([0.5, -0.2], np.float32), 2)]
    adam, yogi = FedAdam(), FedYogi()
    g = np.zeros(2, np.float32)
    for _ in range(3):
        adam.aggregate(g, d), yogi.aggregate(g, d)
    assert not np.allclose(adam.state()["v"], yogi.state()["v"])
    restored = FedYogi()
    restored.load_state(yogi.state())
    np.testing.assert_allclose(restored.aggregate(g, d), yogi.aggregate(g, d))


def _trainable(out: int, rank: int, inp: int) -> list[TrainableParam]:
    # Named unlike LoRA on purpose: the manifest's roles pair the factors, not their names.
    return [TrainableParam("l.down", [rank, inp], "float32", 0, LoraFactor("l", "A")),
            TrainableParam("l.up", [out, rank], "float32", rank * inp, LoraFactor("l", "B")),
            TrainableParam("head.bias", [2], "float32", rank * inp + out * rank)]


def test_lora_svd_matches_the_exact_mean_product_where_factor_averaging_does_not():
    rng = np.random.default_rng(0)
    out, rank, inp = 6, 2, 5
    size = rank * inp + out * rank + 2
    g = np.zeros(size, np.float32)
    updates = [Update(rng.normal(size=size).astype(np.float32), w) for w in (1, 2, 3)]
    strategy = LoraAware(_trainable(out, rank, inp))
    new = strategy.aggregate(g, updates)
    exact = sum(u.weight * (u.delta[10:22].reshape(out, rank) @ u.delta[:10].reshape(rank, inp))
                for u in updates) / 6
    product = new[10:22].reshape(out, rank).astype(np.float64) @ new[:10].reshape(rank, inp)
    best = np.linalg.svd(exact, compute_uv=False)
    # Truncated SVD is the best rank-r approximation: its error is the tail singular values.
    assert np.linalg.norm(product - exact) == pytest.approx(np.sqrt((best[rank:] ** 2).sum()), rel=1e-4)
    assert strategy.last_report["svd_rel_error"] < strategy.last_report["naive_rel_error"]
    np.testing.assert_allclose(new[-2:], sum(u.weight * u.delta[-2:] for u in updates) / 6, rtol=1e-5)


def test_make_strategy_names():
    assert make_strategy("fedyogi").name == "fedyogi"
    assert make_strategy("lora-svd", _trainable(4, 2, 3)).name == "lora-svd"
    with pytest.raises(ValueError, match="accepted"):
        make_strategy("bulyan")


def test_lora_svd_refuses_trainable_entries_without_lora_factors():
    # A head-only bundle, or one built before the manifest recorded LoRA factors
    head_only = [TrainableParam("head.bias", [2], "float32", 0)]
    with pytest.raises(ValueError, match=r"no LoRA factors|lists none"):
        make_strategy("lora-svd", head_only)
