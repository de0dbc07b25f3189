"""Robust aggregation and the update guards, on arrays with hand-checked answers."""

from __future__ import annotations

import numpy as np
import pytest

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.strategy import CoordinateMedian, Krum, MultiKrum, TrimmedMean, Update, make_strategy
from edgeftl.coordinator.rounds.strategy.guard import cap_weights, clip_l2, guard_updates
from edgeftl.coordinator.rounds.strategy.krum import krum_scores, krum_select
from edgeftl.coordinator.rounds.strategy.trimmed import trimmed_mean
from edgeftl.device.cli import main


def _honest_and_outliers(honest: int, outliers: int, size: int = 8, seed: int = 0) -> list[Update]:
    """`honest` deltas near 1.0 (noise 0.1), then `outliers` deltas at -1000 or +1e6: the attackers."""
    rng = np.random.default_rng(seed)
    good = [Update((1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32), 100) for _ in range(honest)]
    bad = [Update(np.full(size, -1000.0 if i % 2 else 1e6, np.float32), 10**6) for i in range(outliers)]
    return good + bad


# ---- aggregators ---------------------------------------------------------------------------------
def test_median_ignores_a_minority_of_outliers():
    # Prepare: 3 honest devices with the values 1, 2, 3 in every coordinate, 2 attackers far away
    updates = [Update(np.full(3, v, np.float32), 1) for v in (1.0, 2.0, 3.0, 1e6, -1e6)]
    # Execute
    out = CoordinateMedian().aggregate(np.full(3, 10.0, np.float32), updates)
    # Assert: sorted column 1e6 > 3 > 2 > 1 > -1e6: the median is the honest 2
    np.testing.assert_array_equal(out, [12.0, 12.0, 12.0])


def test_median_of_an_even_count_is_the_mean_of_the_middle_two_and_ignores_weights():
    updates = [Update(np.array([v], np.float32), w) for v, w in ((1.0, 1), (2.0, 1), (4.0, 1), (9.0, 10**6))]
    np.testing.assert_allclose(CoordinateMedian().aggregate(np.zeros(1, np.float32), updates), [3.0])


def test_trimmed_mean_equals_the_mean_of_the_kept_values():
    # Prepare: 5 updates, fraction 0.2 -> k = 1 dropped from each side per coordinate
    column0, column1 = [5.0, -100.0, 1.0, 2.0, 100.0], [3.0, 4.0, 7.0, -9.0, 0.0]
    updates = [Update(np.array([a, b], np.float32), 1) for a, b in zip(column0, column1)]
    # Execute
    delta, k = trimmed_mean(updates, 0.2)
    # Assert: kept {1, 2, 5} and {0, 3, 4}
    assert k == 1
    np.testing.assert_allclose(delta, [np.mean([1.0, 2.0, 5.0]), np.mean([0.0, 3.0, 4.0])])


def test_trimmed_mean_bounds_f_outliers_by_honest_values():
    updates = _honest_and_outliers(honest=8, outliers=2)
    strategy = TrimmedMean(fraction=0.2)
    out = strategy.aggregate(np.zeros(8, np.float32), updates)
    honest = np.stack([u.delta for u in updates[:8]])
    assert (out >= honest.min(axis=0)).all() and (out <= honest.max(axis=0)).all()
    assert strategy.report() == {"trimmed_per_side": 2}


def test_trimmed_mean_that_trims_nothing_is_the_plain_mean_and_says_so(caplog):
    updates = [Update(np.array([v], np.float32), 1) for v in (1.0, 2.0, 6.0)]
    strategy = TrimmedMean(fraction=0.1)  # 0.1 x 3 < 1
    np.testing.assert_allclose(strategy.aggregate(np.zeros(1, np.float32), updates), [3.0])
    assert strategy.report() == {"trimmed_per_side": 0}
    assert "trims none" in caplog.text


def test_krum_scores_by_hand():
    # Prepare: 1-D points 0, 1, 3, 10, 50; f = 1 -> each point sums its n - f - 2 = 2 nearest squared distances
    deltas = np.array([[0.0], [1.0], [3.0], [10.0], [50.0]])
    # Execute / Assert: 0: 1 + 9; 1: 1 + 4; 3: 4 + 9; 10: 49 + 81; 50: 1600 + 2209
    np.testing.assert_allclose(krum_scores(deltas, 1), [10.0, 5.0, 13.0, 130.0, 3809.0])
    np.testing.assert_array_equal(krum_select(deltas, 1, 3), [1, 0, 2])


def test_krum_picks_an_honest_update_and_multi_krum_averages_only_honest_ones():
    updates = _honest_and_outliers(honest=7, outliers=2)
    g = np.zeros(8, np.float32)
    honest = [u.delta for u in updates[:7]]
    # Krum: exactly one of the honest deltas
    krum = Krum(byzantine=2).aggregate(g, updates)
    assert any(np.array_equal(krum, h) for h in honest)
    # Multi-Krum with m = n - f = 7: the uniform mean of the 7 honest deltas (sample counts ignored)
    strategy = MultiKrum(byzantine=2)
    np.testing.assert_allclose(strategy.aggregate(g, updates), np.mean(honest, axis=0), rtol=1e-6)
    assert strategy.report() == {"selected": 7, "fallback_median": 0, "kept_global": 0}


def test_krum_with_too_few_updates_falls_back_to_the_median_then_keeps_the_global(caplog):
    g = np.full(1, 5.0, np.float32)
    four = [Update(np.array([v], np.float32), 1) for v in (1.0, 2.0, 3.0, 1e6)]  # f = 1: needs n > 4
    strategy = Krum(byzantine=1)
    np.testing.assert_allclose(strategy.aggregate(g, four), [7.5])  # 5 + median(1, 2, 3, 1e6)
    assert strategy.report()["fallback_median"] == 1 and "too few" in caplog.text
    np.testing.assert_array_equal(strategy.aggregate(g, four[:2]), g)  # n = 2 <= 2f
    assert strategy.report()["kept_global"] == 1 and "keeping the global" in caplog.text
    with pytest.raises(ValueError, match="more than 2f"):
        krum_scores(np.zeros((4, 1)), 1)


def test_make_strategy_builds_the_robust_ones_with_their_parameters():
    assert make_strategy("median").name == "median"
    assert make_strategy("trimmed-mean", trim_fraction=0.3).fraction == 0.3
    krum = make_strategy("krum", byzantine=2)
    multi = make_strategy("multi-krum", byzantine=1, krum_select=4)
    assert (krum.name, krum.byzantine, krum.select) == ("krum", 2, 1)
    assert (multi.name, multi.byzantine, multi.select) == ("multi-krum", 1, 4)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        make_strategy("trimmed-mean", trim_fraction=0.5)


# ---- guards ----------------------------------------------------------------------------------------
def test_clip_l2_scales_down_only_what_is_outside():
    delta, norm = clip_l2(np.array([3.0, 4.0], np.float32), 1.0)
    np.testing.assert_allclose(delta, [0.6, 0.8], rtol=1e-6)
    assert norm == pytest.approx(5.0)
    inside = np.array([0.3, 0.4], np.float32)
    assert clip_l2(inside, 1.0)[0] is inside


def test_cap_weights_caps_at_ratio_times_the_median():
    updates = [Update(np.zeros(1, np.float32), w) for w in (100, 120, 150, 10**6)]
    capped, count = cap_weights(updates, 10.0)
    assert [u.weight for u in capped] == [100, 120, 150, 1350.0]  # median 135
    assert count == 1
    assert cap_weights(updates, 0)[0] is updates  # 0 = off


def test_guard_reports_norms_clips_and_caps():
    updates = [Update(np.array([3.0, 4.0], np.float32), 10), Update(np.array([0.0, 1.0], np.float32), 10),
               Update(np.array([0.0, 2.0], np.float32), 10**6)]
    guarded, report = guard_updates(updates, max_norm=2.5, max_weight_ratio=10)
    assert report == {"update_norm_max": 5.0, "update_norm_median": 2.0, "updates_clipped": 1, "weights_capped": 1}
    assert [u.weight for u in guarded] == [10, 10, 100]
    assert np.linalg.norm(guarded[0].delta) == pytest.approx(2.5)
    assert guard_updates(updates, 0, 0)[1]["updates_clipped"] == 0


def test_a_capped_weight_keeps_fedavg_near_the_honest_mean():
    # Without the cap one device claiming 10**6 samples is the whole average
    updates = [*_honest_and_outliers(honest=9, outliers=0), Update(np.full(8, 10.0, np.float32), 10**6)]
    fedavg = make_strategy("fedavg")
    uncapped = fedavg.aggregate(np.zeros(8, np.float32), updates)
    capped = fedavg.aggregate(np.zeros(8, np.float32), cap_weights(updates, 10)[0])
    assert uncapped.mean() > 9.9  # the attacker's 10
    assert capped.mean() == pytest.approx((9 * 100 * 1.0 + 1000 * 10.0) / 1900, abs=0.1)  # 1 + 9 x 1000/1900


# ---- configuration and CLI --------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"strategy": "krum"}, "--byzantine f >= 1"),
    ({"strategy": "multi-krum", "byzantine": 2, "devices_per_round": 6}, r"more than 6 updates a round"),
    ({"strategy": "multi-krum", "byzantine": 1, "devices_per_round": 5, "krum_select": 6}, "exceeds"),
    ({"byzantine": -1}, "must be >= 0"),
    ({"trim_fraction": 0.5}, r"\[0, 0.5\)"),
    ({"max_weight_ratio": 0.5}, "0 \\(no cap\\) or >= 1"),
])
def test_config_names_what_is_wrong(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        CoordinatorConfig(out=tmp_path, **fields)


def test_config_accepts_the_robust_settings(tmp_path):
    config = CoordinatorConfig(out=tmp_path, strategy="multi-krum", byzantine=2, devices_per_round=10)
    assert (config.max_weight_ratio, config.trim_fraction, config.krum_select) == (10.0, 0.1, 0)


def test_cli_refuses_krum_without_byzantine_before_connecting(tmp_path, capsys):
    rc = main(["coordinator", "--broker", "mqtt://127.0.0.1:9", "--bundle", str(tmp_path), "--out",
               str(tmp_path / "run"), "--strategy", "krum"])
    assert rc != 0
    assert "--byzantine" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not an int
        main(["coordinator", "--broker", "mqtt://127.0.0.1:9", "--bundle", str(tmp_path), "--out",
              str(tmp_path / "run"), "--byzantine", "two"])
