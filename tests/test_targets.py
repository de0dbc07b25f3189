"""Bytes to reach a target accuracy (coordinator/report/targets.py) and bench_federation's table of it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeftl.coordinator.report.targets import Reached, curve, final_accuracy, ratio, reach, reference_target

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def _records(accuracies: list[float | None], up: int, down: int) -> list[dict]:
    """Rounds as metrics.jsonl holds them: every round `up` bytes up and `down` down, round 0 a double download
    (each device's first full sync)."""
    out = []
    for i, accuracy in enumerate(accuracies):
        record = {"round": i, "bytes_up": up, "bytes_down": 2 * down if i == 0 else down, "updates_received": 10}
        if accuracy is not None:
            record["accuracy"] = accuracy
        out.append(record)
    return out


def test_reach_counts_rounds_and_bytes_up_to_the_first_round_at_the_target():
    # Prepare: 0.60, 0.85, 0.91, 0.89, 0.96; 1,000 B up and 5,000 B down per round
    records = _records([0.60, 0.85, 0.91, 0.89, 0.96], up=1000, down=5000)
    # Execute
    hit = reach(records, 0.90)
    # Assert (by hand: round index 2 -> 3 rounds, 3,000 B up, 10,000 + 5,000 + 5,000 B down)
    assert hit == Reached(target=0.90, rounds=3, accuracy=0.91, bytes_up=3000, bytes_down=20000)
    assert reach(records, 0.91).rounds == 3  # at the target counts
    assert reach(records, 0.95) == Reached(0.95, 5, 0.96, 5000, 30000)  # the dip at round 3 does not matter


def test_a_target_never_reached_is_none_and_unevaluated_rounds_still_cost_bytes():
    records = _records([None, 0.70, None, 0.93], up=100, down=400)
    assert reach(records, 0.99) is None
    assert reach(records, 0.90) == Reached(0.90, 4, 0.93, 400, 2000)  # round 2 was not scored but was paid for
    assert reach([], 0.5) is None


def test_reference_target_is_the_final_accuracy_minus_points_and_ratio_guards_zero():
    records = _records([0.5, 0.973, None], up=1, down=1)
    assert final_accuracy(records) == pytest.approx(0.973)
    assert reference_target(records) == pytest.approx(0.963)
    assert reference_target(_records([None], 1, 1)) is None
    assert ratio(6_000_000, 60_000) == pytest.approx(100.0)
    assert ratio(1, 0) is None and ratio(None, 3) is None


def test_curve_pairs_each_scored_round_with_the_bytes_sent_so_far():
    records = _records([0.5, None, 0.8], up=300, down=1000)
    assert curve(records, "bytes_up") == [(300, 0.5), (900, 0.8)]
    assert curve(records, "bytes_down") == [(2000, 0.5), (4000, 0.8)]
    assert curve(records, "bytes_up", key="perplexity") == []


def test_bench_federation_table_gives_rounds_bytes_and_issue16_verdicts():
    import bench_federation

    # Prepare: fp32 reaches its final 97% - 1 pt = 96% at round 3 (4 rounds); a codec 200x smaller per round
    # reaches it at round 4 (5 rounds) and downloads half as much per round
    fp32 = _records([0.80, 0.90, 0.95, 0.96, 0.97], up=200_000, down=200_000)
    small = _records([0.70, 0.85, 0.93, 0.95, 0.965], up=1_000, down=100_000)
    results = {"federated": {"none": fp32, "topk:0.01+int8": small}}
    # Execute
    text, verdicts = bench_federation.target_rows(results)
    # Assert: to 96%: fp32 4 rounds, 800,000 B up; the codec 5 rounds, 5,000 B up -> 160x fewer, 1.25x the rounds;
    # down: fp32 1,000,000 B, codec 600,000 B -> 1.7x fewer; final -0.5 pt
    assert "| none | 19.5 KiB | 2 r · 391 KiB up · 586 KiB down |" in text
    assert "4 r · 781 KiB up · 977 KiB down" in text and "5 r · 4.88 KiB up · 586 KiB down" in text
    assert verdicts == ["- topk:0.01+int8: upload 160.0x fewer (target >= 100x): PASS; rounds 5 vs 4 = 1.25x "
                        "(target <= 1.2x): MISS; downlink 1.7x fewer (target >= 10x): MISS; final -0.5 pt vs fp32 "
                        "(target within 0.5 pt): PASS"]


def test_bench_federation_codec_table_sets_each_seed_against_its_own_fp32_run():
    import bench_federation

    # Prepare: fp32 ends at 97% on seed 0 and 96% on seed 1; a codec 100x smaller ends 0.5 pt under each
    results = {"federated": {"none": _records([0.9, 0.97], up=100_000, down=1), "none#seed1": _records(
        [0.9, 0.96], up=100_000, down=1), "sign": _records([0.9, 0.965], up=1_000, down=1),
        "sign#seed1": _records([0.9, 0.955], up=1_000, down=1)}}
    # Execute
    _, verdicts = bench_federation.codec_rows(results)
    # Assert: both -0.5 pt (seed 1 against seed 0's fp32 would read -1.5)
    assert verdicts == [f"- PASS {case}: 100.0x fewer upload bytes (target >= 50x), final accuracy -0.5 pt vs fp32 "
                        "(target within 1 pt)" for case in ("sign", "sign#seed1")]


def test_bench_federation_proxy_table_sets_short_runs_against_fp32s_first_rounds():
    import bench_federation

    fp32 = _records([0.80, 0.90, 0.95, 0.96, 0.97], up=200_000, down=200_000)
    short = _records([0.70, 0.91], up=1_000, down=1_000)
    short[-1]["loss"], fp32[1]["loss"] = 0.5, 0.4
    text = bench_federation.proxy_rows({"federated": {"none": fp32}, "proxy": {"sign/sign": short}})
    # fp32's row is cut to the proxy's 2 rounds; both reach 90% after round 1
    assert "| none (first rounds of the full run) | 19.5 KiB | 2 r · 391 KiB up · 586 KiB down |" in text
    row = "| sign/sign | 100 B | 2 r · 1.95 KiB up · 2.93 KiB down | not reached | not reached | 91.0% | 0.500 |"
    assert row in text
    assert bench_federation.proxy_rows({"federated": {"none": fp32}}) == ""
