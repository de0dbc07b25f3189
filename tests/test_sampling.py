"""The online set and the sampling modes (coordinator/rounds/sampling.py)."""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest

from edgeftl.coordinator.rounds import loop
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.coordinator.rounds.sampling import MEMORY_KEY, SAMPLE_MODES, OnlineDevices, Sampler
from edgeftl.device.cli import main
from edgeftl.device.link import InProcessBroker
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest
from edgeftl.device.protocol.messages import Status, Task, Update
from edgeftl.device.runtime import trainable_vector

from fixtures_build import bundle, coordinator_link, device_link


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return bundle(tmp_path_factory, "bert-int8")


def _fleet(count: int, memory=lambda i: None) -> OnlineDevices:
    devices = OnlineDevices()
    for i in reversed(range(count)):  # arrival order must not matter
        free = memory(i)
        devices.note(Status(f"dev-{i:04d}", True, {MEMORY_KEY: free} if free is not None else {}))
    return devices


def test_statuses_keep_the_online_set_and_the_cards():
    # Prepare: three births, one will, one clean offline, one comeback; cards with and without memory
    devices = OnlineDevices()
    for status in (Status("a", True, {MEMORY_KEY: 512}), Status("b", True), Status("c", True, {MEMORY_KEY: "lots"}),
                   Status("b", False, {"will": 1}), Status("c", False), Status("c", True)):
        devices.note(status)
    # Assert
    assert devices.count == 2 and devices.online == {"a", "c"} and devices.offline == {"b"}
    assert devices.memory_mib == {"a": 512.0} and set(devices.last_seen) == {"a", "b", "c"}


def test_uniform_draws_the_sample_earlier_runs_drew():
    devices = _fleet(50)
    sampler = Sampler("uniform", np.random.default_rng(3))
    old = np.random.default_rng(3)  # the loop's former _sample(), inline
    for round_index in range(5):
        expected = sorted(old.choice(sorted(devices.online), size=7, replace=False).tolist())
        assert sampler.sample(devices, 7, round_index) == expected
    assert sampler.sample(_fleet(4), 7, 5) == [f"dev-{i:04d}" for i in range(4)]  # fewer online: all of them
    assert len(sampler.sample(devices, 0, 6)) == 50  # 0: every online device


def test_memory_sampling_favours_devices_with_room():
    # Prepare: half the fleet reports 4096 MiB free, half 256, and ten report nothing (weigh as the median)
    devices = _fleet(100, lambda i: None if i >= 90 else (4096 if i % 2 else 256))
    sampler = Sampler("memory", np.random.default_rng(0))
    # Execute
    picks = Counter(d for r in range(200) for d in sampler.sample(devices, 10, r))
    # Assert: 16x the weight gives several times the picks; every device stays possible
    rich = sum(picks[f"dev-{i:04d}"] for i in range(90) if i % 2)
    poor = sum(picks[f"dev-{i:04d}"] for i in range(90) if not i % 2)
    assert rich > 5 * poor and poor > 0 and sum(picks.values()) == 2000


def test_fair_sampling_visits_every_device_before_any_twice():
    devices = _fleet(100)
    sampler = Sampler("fair", np.random.default_rng(1))
    first = [d for r in range(10) for d in sampler.sample(devices, 10, r)]
    assert sorted(first) == sorted(devices.online)  # 10 rounds of 10: each of the 100 exactly once
    devices.note(Status("new", True))  # a newcomer, never sampled, goes first
    assert "new" in sampler.sample(devices, 10, 10)


@pytest.mark.parametrize("mode", SAMPLE_MODES)
def test_a_restored_sampler_draws_what_an_uninterrupted_one_does(mode):
    # Prepare: the generator state and sampler state as the checkpoint saves them after round 2
    devices = _fleet(60, lambda i: 100 + 37 * i)
    rng = np.random.default_rng(5)
    sampler = Sampler(mode, rng)
    for r in range(3):
        sampler.sample(devices, 8, r)
    saved_rng, saved = rng.bit_generator.state, sampler.state()
    ahead = [sampler.sample(devices, 8, r) for r in range(3, 6)]
    # Execute
    restored_rng = np.random.default_rng(0)
    restored_rng.bit_generator.state = saved_rng
    restored = Sampler(mode, restored_rng)
    restored.load_state(saved)
    # Assert
    assert [restored.sample(devices, 8, r) for r in range(3, 6)] == ahead
    assert saved["sample_mode"] == mode


def test_a_bad_sample_mode_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="--sample must be one of uniform, memory, fair, got 'newest'"):
        CoordinatorConfig(out=tmp_path, sample="newest")
    rc = main(["coordinator", "--broker", "mqtt://127.0.0.1:9", "--bundle", str(tmp_path), "--out",
               str(tmp_path / "run"), "--sample", "random"])
    err = capsys.readouterr().err
    assert rc != 0 and "--sample must be one of uniform, memory, fair, got 'random'" in err
    assert len(err.strip().splitlines()) == 1


# ---- the round loop: sampling survives a kill mid-round ---------------------------------------


class _Crash(Exception):
    pass


def _answer_tasks(links, stop: threading.Event) -> None:
    """Fake devices: each replies to every task that names it with a small synthetic update."""
    while not stop.is_set():
        for link in links:
            item = link.receive(timeout_s=0.002)
            task = getattr(item, "message", None)
            if isinstance(task, Task) and link.device_id in task.devices:
                delta = np.full(SIZE_OF[task.bundle_sha256], 1e-3, np.float32)
                link.send(Update(task.run_id, task.round, task.bundle_sha256, link.device_id, 8, task.round,
                                 Encoded("none", delta.size, {"values": delta})))


SIZE_OF: dict[str, int] = {}


def _run(tiny, out, monkeypatch, crash_round: int | None) -> list[list[str]]:
    """Rounds 0-3 of a `--sample fair` run over 10 fake devices (4 a round); with crash_round, the
    coordinator dies before that round's checkpoint and a second one resumes. The devices of each round."""
    broker = InProcessBroker()
    manifest = read_manifest(tiny)
    initial = trainable_vector(tiny, manifest)
    SIZE_OF[bundle_sha256(tiny)] = initial.size
    links = [device_link(broker, f"dev{i}") for i in range(10)]
    for link in links:
        link.connect()
    stop = threading.Event()
    fleet = threading.Thread(target=_answer_tasks, args=(links, stop), daemon=True)
    fleet.start()
    config = dict(out=out, rounds=4, devices_per_round=4, sample="fair", seed=3, deadline_s=30, wait_devices=10,
                  wait_devices_s=20, run_id="r1")

    def crash_at(name: str, round_index: int) -> None:
        if (name, round_index) == ("before_checkpoint", crash_round):
            raise _Crash

    try:
        monkeypatch.setattr(loop, "failpoint", crash_at)
        first = Coordinator(coordinator_link(broker, "coord-a"), tiny, manifest, initial, CoordinatorConfig(**config))
        first.connect()
        first.wait_for_devices()
        try:
            first.run()
        except _Crash:
            first.link.close(abrupt=True)
            monkeypatch.setattr(loop, "failpoint", lambda name, round_index: None)
            second = Coordinator(coordinator_link(broker, "coord-b"), tiny, manifest, initial,
                                 CoordinatorConfig(**config, resume=True))
            second.connect()
            second.wait_for_devices()
            second.run()
    finally:
        stop.set()
        fleet.join(timeout=10)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [sorted(r["devices"]) for r in records]


def test_a_resumed_fair_run_samples_what_an_uninterrupted_one_does(tiny, tmp_path, monkeypatch):
    # Execute: the same run twice, the second killed in round 1 after its devices replied
    whole = _run(tiny, tmp_path / "whole", monkeypatch, crash_round=None)
    resumed = _run(tiny, tmp_path / "resumed", monkeypatch, crash_round=1)
    # Assert: the same devices every round; fair sampling named 10 different devices in rounds 0-1
    assert resumed == whole and len(whole) == 4
    assert len(set(whole[0]) | set(whole[1])) == 8 and all(len(devices) == 4 for devices in whole)
