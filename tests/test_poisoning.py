"""A poisoned federation: one device sends its real update x1000 claiming 10**6 samples.

Plain FedAvg follows it off a cliff; clipping with the weight cap, or the coordinate-wise median,
keeps the global learning. In-process broker, tiny BERT bundle, real device agents; the attacker
is a real agent whose update is rewritten on its way out (tools/poison.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.evaluate import make_evaluator
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker
from edgeftl.device.protocol.codecs import parse_codec
from edgeftl.device.protocol.manifest import read_manifest
from edgeftl.device.protocol.messages import Update

from fixtures_build import bundle, coordinator_link, in_process_devices, keyword_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from poison import Attack, poison  # tools/ is not a package

DEVICES, ROUNDS = 5, 3


@pytest.mark.parametrize("codec", ["none", "fp16"])
def test_an_attack_rewrites_the_delta_and_the_claimed_samples_only(codec):
    delta = np.array([0.5, -1.0, 2.0], np.float32)
    honest = Update("run", 3, "ab" * 32, "dev9", 40, 7, parse_codec(codec).encode(delta), {"samples": 40})
    sent = Attack(scale=-5.0, samples=10**6).apply(honest)
    np.testing.assert_allclose(parse_codec(sent.vector.codec).decode(sent.vector), -5 * delta)
    assert sent.samples == 10**6 and sent.vector.codec == honest.vector.codec
    assert (sent.run_id, sent.round, sent.device_id, sent.seq, sent.metrics) == ("run", 3, "dev9", 7, {"samples": 40})
    assert Attack(scale=2.0).apply(honest).samples == 40


def _federate(tmp: Path, folder: Path, strategy: str, clip_norm: float, max_weight_ratio: float) -> list[dict]:
    """DEVICES agents, the last one attacking; ROUNDS rounds aggregated with `strategy`."""
    files = []
    for i in range(DEVICES):
        texts, labels = keyword_dataset(48, seed=100 + i)
        files.append(write_csv(tmp / f"device{i}.csv", texts, labels))
    test_csv = write_csv(tmp / "test.csv", *keyword_dataset(96, seed=7))
    broker = InProcessBroker()
    agents, threads = in_process_devices(broker, folder, files, rounds=ROUNDS)
    poison(agents[-1], Attack(scale=1000.0, samples=10**6))
    config = CoordinatorConfig(out=tmp / "run", rounds=ROUNDS, steps=6, batch=16, lr=2e-2, deadline_s=60,
                               wait_devices=DEVICES, wait_devices_s=10, strategy=strategy, clip_norm=clip_norm,
                               max_weight_ratio=max_weight_ratio)
    coordinator = Coordinator(coordinator_link(broker), folder, read_manifest(folder), agents[0].runtime.get_flat(),
                              config, evaluate=make_evaluator(folder, test_csv))
    for t in threads:
        t.start()
    coordinator.connect()
    assert coordinator.wait_for_devices() == DEVICES
    records = coordinator.run()
    for t in threads:
        t.join(timeout=30)
    return records


@pytest.mark.parametrize("strategy, clip_norm, max_weight_ratio, wrecked", [
    ("fedavg", 0.0, 0.0, True),  # no guard: the attacker's update is the round
    ("fedavg", 1.0, 10.0, False),
    ("median", 0.0, 0.0, False),
])
def test_a_hugely_scaled_update_wrecks_fedavg_but_not_clipping_or_the_median(tmp_path, tmp_path_factory, strategy,
                                                                             clip_norm, max_weight_ratio, wrecked):
    # Prepare / Execute
    records = _federate(tmp_path, bundle(tmp_path_factory, "bert-int8"), strategy, clip_norm, max_weight_ratio)
    # Assert: every update arrived, the attacker's dwarfs the honest ones, and the guards say what they did
    assert all(r["updates_received"] == DEVICES for r in records)
    assert all(r["update_norm_max"] > 100 * r["update_norm_median"] for r in records)
    assert all(r["updates_clipped"] >= 1 if clip_norm else r["updates_clipped"] == 0 for r in records)
    assert all(r["weights_capped"] == (1 if max_weight_ratio else 0) for r in records)
    final = records[-1]
    if wrecked:
        assert final["loss"] > 5 and final["accuracy"] < 0.7
    else:
        assert final["loss"] < records[0]["loss"] + 0.05 and final["accuracy"] > 0.7
