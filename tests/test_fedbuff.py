"""Asynchronous buffered aggregation (FedBuff, `--mode async`): the staleness rules, the async inbox,
the wire's optional task mode, light devices, and a federation of real device agents in async mode."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgeftl.coordinator.rounds.async_inbox import LAPSED, AsyncInbox
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.fedbuff import FedBuffCoordinator, buffered_updates, staleness_summary, staleness_weight
from edgeftl.coordinator.rounds.inbox import DeviceFailure, ReceivedUpdate
from edgeftl.coordinator.simulation.light import Behaviour, LightDevice, Shared
from edgeftl.device.agent import AgentConfig, DeviceAgent
from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker
from edgeftl.device.protocol import wire
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.messages import ErrorReply, Global, Task, Update, decode, encode
from edgeftl.device.protocol.topics import Topics

from fixtures_build import bundle, coordinator_link, device_link, keyword_dataset

SHA = "ab" * 32
SIZE = 8


def _update(device: str, round_index: int, seq: int, value: float = 1.0, samples: int = 10) -> Update:
    vector = Encoded("none", SIZE, {"values": np.full(SIZE, value, np.float32)})
    return Update("run", round_index, SHA, device, samples, seq, vector)


def _inbox(version: int = 5, max_staleness: int = 2) -> AsyncInbox:
    inbox = AsyncInbox("run", SHA, SIZE, max_staleness)
    inbox.version = version
    return inbox


# ---- the staleness rules ------------------------------------------------------------------------


def test_staleness_weight_is_fedbuffs_polynomial_discount():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    assert all(staleness_weight(s) > staleness_weight(s + 1) > 0 for s in range(20))


def test_buffered_updates_weigh_samples_by_staleness():
    fresh = ReceivedUpdate(_update("a", 6, 1, samples=10), np.ones(SIZE, np.float32), 100)
    old = ReceivedUpdate(_update("b", 3, 1, samples=10), np.ones(SIZE, np.float32), 100)
    weights = [u.weight for u in buffered_updates([(fresh, 0), (old, 3)])]
    assert weights == [10.0, 5.0]


def test_staleness_summary_has_the_spread_and_a_histogram():
    assert staleness_summary([0, 2, 2, 1]) == {"min": 0, "median": 1.5, "max": 2,
                                               "histogram": {"0": 1, "1": 1, "2": 2}}
    assert staleness_summary([]) == {}


# ---- the async inbox ------------------------------------------------------------------------------


def test_an_invited_device_update_frees_its_slot_and_knows_its_staleness():
    inbox = _inbox(version=5)
    inbox.invite(["a", "b"], 4, now=0.0)  # invited when version 3 was the newest
    taken = inbox.take(_update("a", 4, seq=1), 100)
    assert isinstance(taken, ReceivedUpdate) and inbox.staleness(taken.update) == 2
    assert inbox.training() == 1 and inbox.idle(["a", "b", "c"]) == ["a", "c"]
    assert inbox.take(_update("a", 4, seq=1), 100) is None  # a QoS 1 redelivery: dropped quietly
    assert inbox.progress() == {"round": 6, "selected": 2, "received": 1, "late": 0, "rejected": 0, "failed": 0}
    counted = inbox.close_round()
    assert counted.redelivered == 1 and counted.rejected == {} and inbox.progress()["received"] == 0


def test_an_update_staler_than_the_limit_is_refused_and_counted_and_frees_the_slot():
    inbox = _inbox(version=5, max_staleness=2)
    inbox.invite(["a"], 3, now=0.0)
    assert inbox.take(_update("a", 3, seq=1), 100) is None  # trained on version 2: 3 behind
    assert inbox.training() == 0
    assert inbox.close_round().rejected == {"stale": 1}


def test_replies_from_uninvited_devices_future_versions_and_bad_vectors_are_refused():
    inbox = _inbox(version=5)
    assert inbox.take(_update("stranger", 6, seq=1), 100) is None
    inbox.invite(["a"], 6, now=0.0)
    assert inbox.take(_update("a", 8, seq=1), 100) is None  # claims version 7, the newest is 5
    assert inbox.take(_update("a", 6, seq=2, value=float("nan")), 100) is None
    assert inbox.training() == 1  # a refused message does not end the invitation
    assert inbox.close_round().rejected == {"unknown device": 1, "bad round": 1, "not finite": 1}


def test_error_replies_wills_and_the_deadline_end_invitations():
    inbox = _inbox(version=5)
    inbox.invite(["a", "b", "c"], 6, now=0.0)
    failure = inbox.take(ErrorReply("run", 6, SHA, "a", "train_failed", "boom"), 50)
    assert isinstance(failure, DeviceFailure) and failure.code == "train_failed"
    assert inbox.offline("b").code == "offline" and inbox.offline("b") is None
    assert inbox.expire(now=5.0, deadline_s=10.0) == []
    (lapsed,) = inbox.expire(now=10.0, deadline_s=10.0)
    assert lapsed.device_id == "c" and lapsed.code == LAPSED and inbox.training() == 0
    assert inbox.take(_update("c", 6, seq=1), 100) is None  # its invitation ended: late, not refused
    counted = inbox.close_round()
    assert counted.late == 1 and counted.rejected == {}


def test_a_reply_to_an_earlier_invitation_is_late():
    inbox = _inbox(version=5)
    inbox.invite(["a"], 6, now=0.0)
    assert inbox.take(_update("a", 4, seq=3), 100) is None
    assert inbox.close_round().late == 1 and inbox.training() == 1


# ---- the wire and the configuration ----------------------------------------------------------------


def test_a_sync_task_encodes_without_mode_and_an_async_one_round_trips():
    sync = Task("run", 3, SHA, ("a",), 60.0, 1e-3, "none")
    header, _ = wire.decode_message(encode(sync), 1 << 20)
    assert "mode" not in header  # the bytes older peers already read
    async_task = Task("run", 3, SHA, ("a",), 60.0, 1e-3, "none", mode="async")
    assert decode(encode(async_task), 1 << 20) == async_task and decode(encode(sync), 1 << 20).mode == "sync"


@pytest.mark.parametrize("bad, says", [
    ({"secure_aggregation": True}, "cannot use --secure-aggregation"),
    ({"resume": True}, "cannot --resume"),
    ({"dp_noise": 1.0, "clip_norm": 1.0}, "cannot use --dp-noise"),
    ({"devices_per_round": 4, "buffer": 5}, "--buffer 5 exceeds --devices-per-round 4"),
    ({"max_staleness": -1}, "--max-staleness"),
])
def test_async_configurations_that_cannot_work_are_refused_in_one_line(tmp_path, bad, says):
    with pytest.raises(ValueError, match=says) as caught:
        CoordinatorConfig(out=tmp_path, mode="async", **bad)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="unknown --mode 'fedbuff'; accepted: sync, async"):
        CoordinatorConfig(out=tmp_path, mode="fedbuff")


# ---- light devices ----------------------------------------------------------------------------------


class _Port:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent.append((topic, payload))

    def subscribe(self, filters: list[str]) -> None:
        self.subscribed = filters

    def unsubscribe(self, filters: list[str]) -> None:
        pass

    def drop(self, offline_s: float) -> None:
        pass


def _frame(device: LightDevice, topic: str, message: object) -> None:
    (frame,) = [f for _, f in device.framer.frames(topic, encode(message), False)]  # type: ignore[arg-type]
    device.on_frame(topic, frame, now=0.0)


def test_a_light_device_trains_an_async_task_on_the_newest_global_it_holds():
    shared, port = Shared("p", SHA, SIZE), _Port()
    device = LightDevice("l-1", shared, Behaviour(), port)
    device.on_connect()
    topics = Topics("p")
    full = Encoded("none", SIZE, {"values": np.zeros(SIZE, np.float32)})
    _frame(device, topics.global_params, Global("run", 6, SHA, full))  # it holds version 6
    _frame(device, topics.task, Task("run", 4, SHA, ("l-1",), 60.0, 1e-3, "none", mode="async"))
    device.tick(now=1.0)
    (update,) = [decode(p, 1 << 20) for t, p in port.sent if "/update/" in t]
    assert isinstance(update, Update) and update.round == 7  # trained on version 6, not the task's 3
    port.sent.clear()
    _frame(device, topics.task, Task("run", 8, SHA, ("l-1",), 60.0, 1e-3, "none"))  # sync: needs exactly 7
    device.tick(now=2.0)
    assert not [t for t, _ in port.sent if "/update/" in t]


def test_a_light_device_fetches_the_full_global_for_a_new_runs_task():
    """A fleet that outlives a run: the next run's task comes before any global it can use (its first
    delta comes only after updates), so the device reads the retained full global, as the agent does."""
    shared, port = Shared("p", SHA, SIZE), _Port()
    device = LightDevice("l-1", shared, Behaviour(), port)
    device.on_connect()
    topics = Topics("p")
    _frame(device, topics.global_params, Global("run", 6, SHA, Encoded("none", SIZE, {"values": np.zeros(SIZE,
                                                                                                       np.float32)})))
    port.subscribed = []
    _frame(device, topics.task, Task("run-2", 0, SHA, ("l-1",), 60.0, 1e-3, "none", mode="async"))
    assert any(f.startswith(topics.global_params) for f in port.subscribed)
    _frame(device, topics.global_params, Global("run-2", -1, SHA, Encoded("none", SIZE, {"values": np.zeros(
        SIZE, np.float32)})))
    device.tick(now=1.0)
    (update,) = [decode(p, 1 << 20) for t, p in port.sent if "/update/" in t]
    assert isinstance(update, Update) and (update.run_id, update.round) == ("run-2", 0)


# ---- real device agents ----------------------------------------------------------------------------


def test_a_device_agent_trains_an_async_task_on_the_newest_global_and_a_sync_one_on_its_round(tmp_path,
                                                                                                tmp_path_factory):
    from edgeftl.device.protocol.manifest import bundle_sha256

    folder = bundle(tmp_path_factory, "bert-int8")
    texts, labels = keyword_dataset(16, seed=3)
    broker = InProcessBroker()
    agent = DeviceAgent(device_link(broker, "dev0"), AgentConfig("dev0", folder, write_csv(tmp_path / "d.csv", texts,
                                                                                              labels), threads=1))
    coordinator = coordinator_link(broker, "coordinator")
    agent.start()
    coordinator.connect()
    sha, params = bundle_sha256(folder), agent.runtime.get_flat()
    agent.handle(Global("run", 6, sha, Encoded("none", params.size, {"values": params})))  # holds version 6
    assert agent.handle(Task("run", 4, sha, ("dev0",), 60.0, 1e-3, "none", steps=1, batch=4, mode="async")) == 1
    assert agent.handle(Task("run", 5, sha, ("dev0",), 60.0, 1e-3, "none", steps=1, batch=4)) == 0  # sync: waits
    replies = [coordinator.receive(timeout_s=0.5) for _ in range(4)]  # its birth, its update, nothing more
    rounds = [r.message.round for r in replies if r is not None and isinstance(r.message, Update)]
    assert rounds == [7]  # trained on version 6, the newest held, not the task's 3
    agent.close()
    coordinator.close()


def test_a_version_closes_at_the_deadline_and_a_silent_device_loses_its_slot(tmp_path, tmp_path_factory):
    """A scripted device that answers every invitation at once and one that never answers: each version
    aggregates the one update it got by the deadline; the silent device's invitation lapses (code deadline)."""
    from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest

    folder = bundle(tmp_path_factory, "bert-int8")
    manifest, sha = read_manifest(folder), bundle_sha256(folder)
    broker, stop = InProcessBroker(), threading.Event()
    fast, mute = device_link(broker, "fast"), device_link(broker, "mute")
    fast.connect()
    mute.connect()

    def answer() -> None:
        seq = 0
        while not stop.is_set():
            item = fast.receive(timeout_s=0.1)
            task = getattr(item, "message", None)
            if isinstance(task, Task) and "fast" in task.devices:
                seq += 1
                zeros = Encoded("none", manifest.trainable_count, {"values": np.zeros(manifest.trainable_count,
                                                                                      np.float32)})
                fast.send(Update(task.run_id, task.round, sha, "fast", 10, seq, zeros))

    worker = threading.Thread(target=answer, daemon=True)
    worker.start()
    config = CoordinatorConfig(out=tmp_path / "run", rounds=2, deadline_s=1.0, wait_devices=2, wait_devices_s=10,
                               mode="async", buffer=2, devices_per_round=2)
    coordinator = FedBuffCoordinator(coordinator_link(broker, "coordinator"), folder, manifest,
                                     np.zeros(manifest.trainable_count, np.float32), config)
    try:
        coordinator.connect()
        assert coordinator.wait_for_devices() == 2
        records = coordinator.run()
    finally:
        stop.set()
        worker.join(timeout=10)
    assert [r["updates_used"] for r in records] == [1, 1] and all(r["aggregated"] for r in records)
    assert [r["staleness"]["max"] for r in records] == [0, 0]
    assert records[0]["devices_selected"] == 2 and records[1]["devices_selected"] == 1  # fast again; mute still held
    assert records[0]["failures"] == {} and records[1]["failures"]["mute"]["code"] == LAPSED


def test_real_devices_of_mixed_speeds_federate_in_async_mode(tmp_path, tmp_path_factory):
    """Four in-process device agents (two simulated 4x slower), at most three training at a time,
    a version every two updates: versions advance, each from two updates, staleness within the limit."""
    folder = bundle(tmp_path_factory, "bert-int8")
    texts, labels = keyword_dataset(64, seed=7)
    test_csv = write_csv(tmp_path / "test.csv", texts, labels)
    broker, stop = InProcessBroker(), threading.Event()
    agents = []
    for i in range(4):
        texts, labels = keyword_dataset(32, seed=100 + i)
        data = write_csv(tmp_path / f"d{i}.csv", texts, labels)
        agent = DeviceAgent(device_link(broker, f"dev{i}"),
                            AgentConfig(f"dev{i}", folder, data, threads=1, simulated_slowdown=4.0 if i >= 2 else 1.0))
        agent.start()
        agents.append(agent)

    def serve(agent: DeviceAgent) -> None:
        while not stop.is_set():
            agent.run(stop_after_s=0.3)

    threads = [threading.Thread(target=serve, args=(a,), daemon=True) for a in agents]
    config = CoordinatorConfig(out=tmp_path / "run", rounds=5, steps=3, batch=8, lr=2e-2, deadline_s=60,
                               wait_devices=4, wait_devices_s=10, mode="async", buffer=2, max_staleness=3,
                               devices_per_round=3, codec="int8")
    from edgeftl.coordinator.rounds.evaluate import make_evaluator
    from edgeftl.device.protocol.manifest import read_manifest

    coordinator = FedBuffCoordinator(coordinator_link(broker, "coordinator"), folder, read_manifest(folder),
                                     agents[0].runtime.get_flat(), config, evaluate=make_evaluator(folder, test_csv))
    for t in threads:
        t.start()
    try:
        coordinator.connect()
        assert coordinator.wait_for_devices() == 4
        records = coordinator.run()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    assert [r["version"] for r in records] == [r["round"] for r in records] == [0, 1, 2, 3, 4]
    for record in records:
        assert record["mode"] == "async" and record["aggregated"] and record["updates_used"] == 2
        assert 0 <= record["staleness"]["min"] <= record["staleness"]["max"] <= 3
        assert record["devices_training"] <= 3 and "accuracy" in record
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    assert max(r["staleness"]["max"] for r in records) >= 1  # a buffer mixed versions: asynchronous indeed
    assert sum(a.updates_sent for a in agents) >= 10
    assert records[0]["devices_selected"] == 3  # the first task filled every slot
    assert main(["report", str(tmp_path / "run")]) == 0  # `edgeftl report` reads an async run
    assert "accuracy" in (tmp_path / "run" / "report.html").read_text()

