"""Client-level DP in the round loop: DP off changes nothing, DP on adds the right noise, spends budget
per round, survives a resume, and a tiny federation runs with it (in-process broker)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeftl.coordinator.cli.coordinator import round_line
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.coordinator.rounds.privacy.mechanism import epsilon_for
from edgeftl.coordinator.rounds.strategy import FedAvg, Update
from edgeftl.coordinator.rounds.strategy.guard import clip_updates
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest
from edgeftl.device.protocol.messages import Update as UpdateMessage

from fixtures_build import bundle, coordinator_link, device_link, in_process_federation, keyword_dataset


@pytest.fixture
def tiny_bundle(tmp_path_factory):
    return bundle(tmp_path_factory, "bert-int8")


def _deltas(size: int) -> list[np.ndarray]:
    """Three devices' deltas: norms of about 3, 0.3 and 6, so a clip at 1 bites on two."""
    rng = np.random.default_rng(5)
    return [(scale * rng.standard_normal(size) / np.sqrt(size)).astype(np.float32) for scale in (3.0, 0.3, 6.0)]


def _scripted_round(folder, config: CoordinatorConfig, deltas: list[np.ndarray]) -> tuple[Coordinator, dict]:
    """Round 0 with devices that are this test speaking the protocol: statuses, then fixed updates."""
    size = read_manifest(folder).trainable_count
    broker = InProcessBroker()
    devices = [device_link(broker, f"dev{i}") for i in range(len(deltas))]
    for link in devices:
        link.connect()
    coordinator = Coordinator(coordinator_link(broker), folder, read_manifest(folder), np.zeros(size, np.float32),
                              config)
    coordinator.connect()
    assert coordinator.wait_for_devices() == len(deltas)
    for i, (link, delta) in enumerate(zip(devices, deltas)):  # sample counts 10, 20, 30: FedAvg would weigh them
        link.send(UpdateMessage(config.run_id, 0, bundle_sha256(folder), f"dev{i}", 10 * (i + 1), 0,
                                Encoded("none", size, {"values": delta})))
    record = coordinator.run_round(0)
    coordinator.link.close()
    return coordinator, record


def test_dp_off_changes_nothing(tmp_path, tiny_bundle):
    # Prepare
    size = read_manifest(tiny_bundle).trainable_count
    deltas = _deltas(size)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, clip_norm=1.0, deadline_s=10, wait_devices=3)
    # Execute
    coordinator, record = _scripted_round(tiny_bundle, config, deltas)
    # Assert: bit for bit the sample-weighted FedAvg of the clipped updates, and a record without DP fields
    clipped, _ = clip_updates([Update(d, 10.0 * (i + 1)) for i, d in enumerate(deltas)], 1.0)
    expected = FedAvg().aggregate(np.zeros(size, np.float32), clipped)
    assert record["updates_received"] == 3 and coordinator.privacy is None
    np.testing.assert_array_equal(coordinator.params, expected)
    assert not [key for key in record if key.startswith("dp_")]
    assert " eps " not in round_line(record)


def test_dp_on_adds_noise_of_std_z_clip_over_n_to_the_uniform_mean(tmp_path, tiny_bundle):
    # Prepare
    size = read_manifest(tiny_bundle).trainable_count
    deltas = _deltas(size)
    z, clip = 0.5, 1.0
    settings = {"rounds": 1, "clip_norm": clip, "dp_noise": z, "deadline_s": 10, "wait_devices": 3, "seed": 4}
    # Execute: the same round twice with one seed, once with another
    first, record = _scripted_round(tiny_bundle, CoordinatorConfig(out=tmp_path / "a", **settings), deltas)
    again, _ = _scripted_round(tiny_bundle, CoordinatorConfig(out=tmp_path / "b", **settings), deltas)
    other, _ = _scripted_round(tiny_bundle, CoordinatorConfig(out=tmp_path / "c", **{**settings, "seed": 5}), deltas)
    # Assert: params = uniform mean of the clipped deltas (denominator 3) + N(0, (z C / 3)^2), reproducibly
    clipped, _ = clip_updates([Update(d, 1.0) for d in deltas], clip)
    noise = first.params.astype(np.float64) - np.mean([u.delta for u in clipped], axis=0)
    assert noise.std() == pytest.approx(z * clip / 3, rel=4 / np.sqrt(size))
    np.testing.assert_array_equal(first.params, again.params)
    assert not np.array_equal(first.params, other.params)
    assert record["dp_epsilon"] == pytest.approx(epsilon_for(3, 3, z, 1, 1e-5))
    assert (record["dp_noise"], record["dp_clip_norm"], record["dp_delta"]) == (z, clip, 1e-5)
    assert f" eps {record['dp_epsilon']:.2f}" in round_line(record)


def test_sampling_rate_is_sampled_over_online_and_a_resume_keeps_the_budget(tmp_path, tiny_bundle):
    # Prepare: 2 of 3 online devices per round
    size = read_manifest(tiny_bundle).trainable_count
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, clip_norm=1.0, dp_noise=1.0, deadline_s=10,
                               devices_per_round=2, wait_devices=3)
    # Execute
    _, record = _scripted_round(tiny_bundle, config, _deltas(size))
    again = CoordinatorConfig(**{**vars(config), "rounds": 2, "resume": True})
    resumed = Coordinator(coordinator_link(InProcessBroker(), "coord-b"), tiny_bundle, read_manifest(tiny_bundle),
                          np.zeros(size, np.float32), again)
    resumed.connect()
    # Assert: q = 2/3 (the third device's update is refused: not sampled); the resumed run starts from it
    assert record["updates_received"] == 2 and record["updates_rejected"] == 1
    assert record["dp_epsilon"] == pytest.approx(epsilon_for(3, 2, 1.0, 1, 1e-5))
    assert record["dp_epsilon_sampling_known"] == pytest.approx(epsilon_for(2, 2, 1.0, 1, 1e-5))
    assert resumed.start_round == 1 and resumed.privacy is not None
    assert resumed.privacy.record()["dp_epsilon"] == record["dp_epsilon"]
    resumed.link.close()


def test_tiny_federation_with_dp_records_epsilon_growing_every_round(tmp_path, tmp_path_factory, tiny_bundle):
    # Prepare: three real device agents on their own data, DP with fedadam as the server optimizer
    files = []
    for i in range(3):
        texts, labels = keyword_dataset(32, seed=200 + i)
        files.append(write_csv(tmp_path / f"device{i}.csv", texts, labels))
    config = CoordinatorConfig(out=tmp_path / "run", rounds=3, steps=2, lr=2e-2, deadline_s=60, wait_devices=3,
                               wait_devices_s=10, strategy="fedadam", clip_norm=0.5, dp_noise=0.8, dp_delta=1e-6)
    # Execute
    coordinator, records = in_process_federation(tiny_bundle, files, config, files[0])
    # Assert: every round aggregated, epsilon at delta 1e-6 grows each round as the accountant composes it
    assert [r["updates_received"] for r in records] == [3, 3, 3]
    eps = [r["dp_epsilon"] for r in records]
    assert eps == pytest.approx([epsilon_for(3, 3, 0.8, k, 1e-6) for k in (1, 2, 3)])
    assert eps[0] < eps[1] < eps[2]
    assert all(r["dp_delta"] == 1e-6 and np.isfinite(r["loss"]) for r in records)
    assert np.isfinite(coordinator.params).all()
