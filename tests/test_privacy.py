"""Client-level DP: the RDP accountant against published reference values, the Gaussian mean's noise
scale, and the config's refusals. Pure numpy, no bundle, no broker."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from edgeftl.coordinator.rounds import config as config_module
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.privacy.accountant import (
    RdpAccountant,
    _log_a_fractional,
    epsilon_from_rdp,
    rdp_sampled_gaussian,
)
from edgeftl.coordinator.rounds.privacy.mechanism import DP_STRATEGIES, ClientDp, epsilon_for, gaussian_mean
from edgeftl.coordinator.rounds.strategy import STRATEGIES, Update

# TensorFlow Privacy's compute_dp_sgd_privacy orders (tensorflow/privacy,
# tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_lib.py).
TFP_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, *range(5, 64), 128, 256, 512]


@pytest.mark.parametrize(("n", "batch", "noise", "epochs", "delta", "eps", "order"), [
    (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595, 19.0),
    (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842, 13.0),
    (100000000, 1024, 0.1, 10, 1e-7, 5907982.3113978775, 1.25),
])
def test_epsilon_matches_tensorflow_privacy(n, batch, noise, epochs, delta, eps, order):
    # Reference: tensorflow/privacy, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py,
    # test_compute_dp_sgd_privacy (Test0, Test1, Test2): q = batch / n, steps = ceil(epochs n / batch).
    # Prepare
    steps = math.ceil(epochs * n / batch)
    # Execute
    got, best = epsilon_from_rdp(TFP_ORDERS, steps * rdp_sampled_gaussian(batch / n, noise, TFP_ORDERS), delta)
    # Assert: the same epsilon at the same optimal order (Test2 exercises a fractional order, 1.25)
    assert got == pytest.approx(eps, rel=1e-9)
    assert best == order


def test_rdp_matches_dp_accounting_at_integer_orders():
    # Reference: google/differential-privacy, python/dp_accounting/dp_accounting/rdp/
    # rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian (q 0.01, z 2.5, 50 steps).
    # Its orders 1.5 and 2.5 are left out: dp_accounting now sums that series' terms in absolute value
    # (an upper bound, 3% above the exact value at 1.5); ours is checked against integration below.
    accountant = RdpAccountant(orders=[5, 50, 100])
    accountant.compose(0.01, 2.5, rounds=50)
    np.testing.assert_allclose(accountant.rdp, [2.18075656e-03, 2.38460375e-02, 1.67416308e02], rtol=1e-4)


def test_conversion_matches_dp_accounting():
    # Reference: the same dp_accounting test file, test_compute_epsilon_delta_pure_dp (constant RDP 1.1 over
    # orders 2..32 at delta 1e-5: epsilon 1.32783806176 at order 32, the Canonne-Kamath-Steinke conversion)
    # and test_compute_epsilon_delta_gaussian (z = 4.530877117 without sampling is (1, 1e-6)-DP).
    eps, order = epsilon_from_rdp(range(2, 33), [1.1] * 31, 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=1e-9) and order == 32
    orders = [0.001 * i for i in range(1001, 100000, 3)]
    eps, _ = epsilon_from_rdp(orders, rdp_sampled_gaussian(1.0, 4.530877117, orders), 1e-6)
    assert eps == pytest.approx(1, abs=1e-6)


def _log_a_by_integration(q: float, sigma: float, alpha: float) -> float:
    """log E_{x ~ N(0, sigma^2)} [((1 - q) + q e^{(2x - 1) / (2 sigma^2)})^alpha] on a fine grid, in log space."""
    x = np.linspace(-40 * sigma, 40 * sigma + alpha, 400_001)
    log_ratio = np.logaddexp(np.log1p(-q), np.log(q) + (2 * x - 1) / (2 * sigma**2))
    log_f = -x**2 / (2 * sigma**2) - 0.5 * np.log(2 * np.pi * sigma**2) + alpha * log_ratio
    peak = log_f.max()
    return float(peak + np.log(np.trapezoid(np.exp(log_f - peak), x)))


@pytest.mark.parametrize(("q", "sigma", "alpha"), [
    (0.01, 2.5, 1.5), (0.01, 2.5, 2.5), (1e-4, 1.0, 1.5), (0.1, 100, 20.5), (0.3, 1.0, 7.25), (0.9, 3.0, 1.3),
])
def test_fractional_orders_match_numerical_integration(q, sigma, alpha):
    # The MTZ 2019 series against the defining integral (dp_accounting tests its own the same way, with mpmath)
    assert _log_a_fractional(q, sigma, alpha) == pytest.approx(_log_a_by_integration(q, sigma, alpha), rel=1e-6)


def test_an_order_whose_series_does_not_converge_is_skipped_not_trusted():
    # q near 1 with little noise: the alternating series decays too slowly for 1,000 terms
    assert rdp_sampled_gaussian(0.9, 0.8, [1.3])[0] == math.inf
    accountant = RdpAccountant()
    accountant.compose(0.9, 0.8)
    assert 0 < accountant.epsilon(1e-5) < epsilon_for(1, 1, 0.8, 1, 1e-5)  # the other orders still bound it


def test_plain_gaussian_and_edge_cases():
    orders = [1.5, 2.0, 32.0]
    np.testing.assert_array_equal(rdp_sampled_gaussian(1.0, 2.0, orders), [a / 8 for a in orders])
    np.testing.assert_array_equal(rdp_sampled_gaussian(0.0, 1.0, orders), [0, 0, 0])  # never sampled
    assert np.isinf(rdp_sampled_gaussian(0.5, 0.0, orders)).all()  # no noise: no privacy
    assert epsilon_for(10, 10, 0.0, 1, 1e-5) == math.inf
    with pytest.raises(ValueError, match="q="):
        rdp_sampled_gaussian(1.5, 1.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_from_rdp([2.0], [0.1], 0.0)


def test_epsilon_grows_with_rounds_and_falls_with_noise_and_sampling():
    accountant = RdpAccountant()
    spent = []
    for _ in range(4):
        accountant.compose(0.1, 1.0)
        spent.append(accountant.epsilon(1e-5))
    assert all(a < b for a, b in itertools.pairwise(spent))
    assert epsilon_for(100, 10, 2.0, 4, 1e-5) < spent[-1] < epsilon_for(10, 10, 1.0, 4, 1e-5)


def test_noise_std_is_z_clip_over_n():
    # Prepare: zero deltas, so the mean is the noise alone
    z, clip, n = 0.7, 0.25, 8
    rng = np.random.default_rng(0)
    # Execute: 50 draws of a 4,000-long mean
    draws = np.stack([gaussian_mean([np.zeros(4000, np.float32)] * 3, clip, z, n, rng) for _ in range(50)])
    # Assert: 200,000 samples estimate the std to ~0.2%
    assert draws.std() == pytest.approx(z * clip / n, rel=0.01)
    assert abs(draws.mean()) < 3 * z * clip / n / math.sqrt(draws.size)


def test_mean_clips_each_delta_and_divides_by_the_fixed_denominator():
    # [3, 4] has norm 5: clipped to 1 it is [0.6, 0.8]; [0.1, 0] is inside. Denominator 4 (two did not reply).
    deltas = [np.array([3, 4], np.float32), np.array([0.1, 0], np.float32)]
    mean = gaussian_mean(deltas, 1.0, 0.0, 4, np.random.default_rng(0))
    np.testing.assert_allclose(mean, [(0.6 + 0.1) / 4, 0.8 / 4], rtol=1e-6)
    with pytest.raises(ValueError, match="denominator"):
        gaussian_mean(deltas, 1.0, 1.0, 1, np.random.default_rng(0))


def test_client_dp_ignores_weights_and_is_reproducible():
    updates = [Update(np.array([1, 0], np.float32), 1.0), Update(np.array([0, 1], np.float32), 99.0)]
    first, second = ClientDp(10.0, 1e-6, 1e-5, seed=3), ClientDp(10.0, 1e-6, 1e-5, seed=3)
    a, b = first.noisy_mean(updates, 0, 2, 2), second.noisy_mean(updates, 0, 2, 2)
    np.testing.assert_array_equal(a.delta, b.delta)  # same seed and round: the same noise, bit for bit
    np.testing.assert_allclose(a.delta, [0.5, 0.5], atol=1e-4)  # uniform, not 1:99
    other = ClientDp(10.0, 1.0, 1e-5, seed=3)
    assert not np.array_equal(other.noisy_mean(updates, 1, 2, 2).delta, other.noisy_mean(updates, 2, 2, 2).delta)


def test_client_dp_records_and_restores_its_budget():
    dp = ClientDp(1.0, 1.0, 1e-5, seed=0)
    dp.noisy_mean([Update(np.zeros(3, np.float32), 1.0)], 0, 2, 4)  # q = 1/2
    record = dp.record()
    assert record["dp_epsilon"] == pytest.approx(epsilon_for(4, 2, 1.0, 1, 1e-5))
    assert record["dp_epsilon_sampling_known"] == pytest.approx(epsilon_for(2, 2, 1.0, 1, 1e-5))
    assert (record["dp_delta"], record["dp_noise"], record["dp_clip_norm"]) == (1e-5, 1.0, 1.0)
    resumed = ClientDp(1.0, 1.0, 1e-5, seed=0)
    resumed.load_state(dp.state())
    assert resumed.record() == record


@pytest.mark.parametrize(("fields", "message"), [
    ({"dp_noise": 1.0}, "--dp-noise needs --clip-norm > 0"),
    ({"dp_noise": -0.1, "clip_norm": 1.0}, "--dp-noise must be a finite number >= 0"),
    ({"dp_noise": math.inf, "clip_norm": 1.0}, "--dp-noise must be a finite number >= 0"),
    ({"dp_noise": math.nan, "clip_norm": 1.0}, "--dp-noise must be a finite number >= 0"),
    ({"dp_noise": 1.0, "clip_norm": 1.0, "dp_delta": 1.0}, "--dp-delta must be in"),
    ({"dp_noise": 1.0, "clip_norm": 1.0, "dp_delta": 0.0}, "--dp-delta must be in"),
])
def test_config_refuses_bad_dp_settings(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message) as caught:
        CoordinatorConfig(out=tmp_path, **fields)
    assert "\n" not in str(caught.value)


def test_config_refuses_dp_with_a_strategy_that_sees_individual_updates(tmp_path, monkeypatch):
    # Prepare: a robust aggregator known to the config (the robust helper adds them to STRATEGIES)
    monkeypatch.setattr(config_module, "STRATEGIES", (*STRATEGIES, "median"))
    CoordinatorConfig(out=tmp_path, strategy="median", clip_norm=1.0)  # without DP it is fine
    with pytest.raises(ValueError, match="--dp-noise works with fedavg, fedadam, fedyogi, lora-svd, not 'median'"):
        CoordinatorConfig(out=tmp_path, strategy="median", clip_norm=1.0, dp_noise=1.0)
    for name in DP_STRATEGIES:
        CoordinatorConfig(out=tmp_path, strategy=name, clip_norm=1.0, dp_noise=1.0)
