"""Federated rounds end to end: coordinator + device agents over a broker (in-process and Mosquitto)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.agent import AgentConfig, DeviceAgent
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker, InProcessConnection, Link
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest

from fixtures_build import (
    bundle,
    coordinator_link,
    device_link,
    in_process_devices,
    in_process_federation,
    keyword_dataset,
)


def _device_files(tmp: Path, devices: int, per_device: int) -> list[Path]:
    files = []
    for i in range(devices):
        texts, labels = keyword_dataset(per_device, seed=100 + i)
        files.append(write_csv(tmp / f"device{i}.csv", texts, labels))
    return files


def test_in_process_federation_learns_and_logs_every_round(tmp_path, tmp_path_factory):
    # Prepare: a tiny bundle, 3 devices with their own data, a held-out test file
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest = read_manifest(folder)
    files = _device_files(tmp_path, 3, 48)
    texts, labels = keyword_dataset(96, seed=7)
    test_csv = write_csv(tmp_path / "test.csv", texts, labels)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=4, steps=6, batch=16, lr=2e-2, lr_final=5e-3,
                               deadline_s=60, codec="topk:0.25+int8", wait_devices=3, wait_devices_s=10)
    # Execute
    coordinator, records = in_process_federation(folder, files, config, test_csv)
    # Assert
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert coordinator.task.lr == 5e-3  # --lr-final: the last round's task names it
    assert all(r["updates_received"] == 3 and r["updates_rejected"] == 0 for r in records)
    assert records[-1]["accuracy"] > max(0.7, records[0]["accuracy"] - 0.05)
    assert records[-1]["loss"] < records[0]["loss"]
    dense = 4 * manifest.trainable_count
    assert all(0 < r["bytes_up"] < 3 * dense / 2 for r in records)  # top-25% int8: far below fp32
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_lr_final_decays_the_tasks_learning_rate_geometrically(tmp_path):
    # Prepare
    decaying = CoordinatorConfig(out=tmp_path / "a", rounds=5, lr=0.02, lr_final=0.00125)
    constant = CoordinatorConfig(out=tmp_path / "b", rounds=5, lr=0.02)
    # Execute
    lrs = [decaying.round_lr(r) for r in range(5)]
    # Assert: halved each round from --lr to --lr-final; without it, --lr throughout; a bad value refused
    assert np.allclose(lrs, [0.02, 0.01, 0.005, 0.0025, 0.00125])
    assert [constant.round_lr(r) for r in range(5)] == [0.02] * 5
    with pytest.raises(ValueError, match="--lr-final must be >= 0"):
        CoordinatorConfig(out=tmp_path / "c", lr_final=-1.0)


def test_resume_continues_after_the_last_checkpoint(tmp_path, tmp_path_factory):
    # Prepare: one device, two rounds, then a fresh coordinator with --resume
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest = read_manifest(folder)
    (path,) = _device_files(tmp_path, 1, 32)
    broker = InProcessBroker()
    agent = DeviceAgent(device_link(broker, "dev0"), AgentConfig("dev0", folder, path, threads=1))
    agent.start()
    worker = threading.Thread(target=agent.run, kwargs={"max_rounds": 3, "stop_after_s": 120}, daemon=True)
    worker.start()
    initial = agent.runtime.get_flat()
    first = Coordinator(coordinator_link(broker, "coord-a"), folder, manifest, initial,
                        CoordinatorConfig(out=tmp_path / "run", rounds=2, steps=2, deadline_s=60))
    first.connect()
    first.wait_for_devices()
    first.run()
    after_two = first.params.copy()
    first.link.close()
    # Execute
    second = Coordinator(coordinator_link(broker, "coord-b"), folder, manifest, initial,
                         CoordinatorConfig(out=tmp_path / "run", rounds=3, steps=2, deadline_s=60, resume=True))
    second.connect()
    # Assert: it starts at round 2 from the checkpointed parameters, and round 2 completes
    assert second.start_round == 2
    np.testing.assert_array_equal(second.params, after_two)
    second.wait_for_devices()
    records = second.run()
    worker.join(timeout=30)
    assert [r["round"] for r in records] == [2] and records[0]["updates_received"] == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]


TORCH_FREE_ROUND = r"""
import importlib.abc, json, sys
BLOCKED = {"torch", "transformers", "optimum", "peft", "bitsandbytes", "onnx", "onnxruntime.training"}
def blocked(name):  # a blocked package or any module inside it
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)

class BlockHostPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if blocked(name):
            raise ImportError(f"{name} must not be imported by the coordinator's round loop")

sys.meta_path.insert(0, BlockHostPackages())
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from edgeftl.device.cli import main  # the whole CLI must load without host packages
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.evaluate import make_evaluator
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.protocol.manifest import read_manifest
from edgeftl.device.link import InProcessBroker
from fixtures_build import coordinator_link, in_process_devices

folder, data, out = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
broker = InProcessBroker()
agents, threads = in_process_devices(broker, folder, [data], rounds=1, stop_after_s=60)
config = CoordinatorConfig(out=out, rounds=1, steps=2, deadline_s=60, strategy="fedyogi")
coordinator = Coordinator(coordinator_link(broker, "coordinator"), folder, read_manifest(folder),
                          agents[0].runtime.get_flat(), config, evaluate=make_evaluator(folder, data))
for t in threads:
    t.start()
coordinator.connect()
coordinator.wait_for_devices()
record = coordinator.run()[0]
print(json.dumps({"received": record["updates_received"], "accuracy": record.get("accuracy"),
                  "loaded": sorted(m for m in sys.modules if blocked(m))}))
"""


def test_coordinator_round_loop_runs_without_torch(tmp_path, tmp_path_factory):
    # Prepare: a process where importing torch, transformers, optimum, peft, bitsandbytes, onnx or the
    # ONNX Runtime Training API fails
    import subprocess
    import sys

    folder = bundle(tmp_path_factory, "bert-int8")
    (data,) = _device_files(tmp_path, 1, 32)
    tests_dir = str(Path(__file__).parent)
    # Execute: the CLI import plus one real round (device + coordinator + evaluation)
    result = subprocess.run([sys.executable, "-c", TORCH_FREE_ROUND, tests_dir, str(folder), str(data),
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    # Assert
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["received"] == 1 and summary["loaded"] == [] and 0 <= summary["accuracy"] <= 1


@dataclass
class _OneDevice:
    """A connected agent on an in-process broker, a coordinator-side listener, and a raw sender."""

    agent: DeviceAgent
    listener: Link
    sender: Link
    sha: str
    broker: InProcessBroker

    def close(self) -> None:
        self.agent.close()
        self.listener.close()


def _one_device(tmp_path: Path, tmp_path_factory, state_dir: Path | None = None) -> _OneDevice:
    folder = bundle(tmp_path_factory, "bert-int8")
    (path,) = _device_files(tmp_path, 1, 16)
    broker = InProcessBroker()
    agent = DeviceAgent(device_link(broker, "dev0"), AgentConfig("dev0", folder, path, threads=1, state_dir=state_dir))
    agent.start()
    listener = coordinator_link(broker, "listener")
    listener.connect()
    sender = Link(InProcessConnection(broker, "sender"), "edgeftl", [])
    sender.connect()
    return _OneDevice(agent, listener, sender, bundle_sha256(folder), broker)


def test_agent_waiting_for_a_global_skips_a_bad_message_and_runs_the_task_once_it_arrives(tmp_path, tmp_path_factory):
    # Prepare: a connected agent gets round 1's task before the global of round 0 it needs; then a
    # malformed message and finally that global arrive.
    from edgeftl.device.protocol.codecs import Encoded
    from edgeftl.device.protocol.messages import Global, Task, Update, encode

    one = _one_device(tmp_path, tmp_path_factory)
    agent, listener, sender, sha = one.agent, one.listener, one.sender, one.sha
    reference = agent.runtime.get_flat()
    sender.send(Task("run", 1, sha, ("dev0",), 60.0, 1e-2, "none", steps=1))
    assert agent.run(stop_after_s=0.5) == 0 and agent.waiting is not None
    sender.connection.send(sender.topics.global_params, b"\x00 not a message", 1, True)
    sender.send(Global("run", 0, sha, Encoded("none", reference.size, {"values": reference})))
    # Execute
    sent = agent.run(max_rounds=1, stop_after_s=60)
    # Assert: round 1 trained on the global that came after the bad message, and replied once
    assert sent == 1 and agent.global_round == 0 and agent.waiting is None
    replies = [listener.receive(0.0) for _ in range(3)]
    updates = [r.message for r in replies if r is not None and isinstance(r.message, Update)]
    assert len(updates) == 1 and updates[0].round == 1 and updates[0].device_id == "dev0"
    # ... and the same task again (the retained task after a reconnect) is not trained twice: the
    # device sends the same update again (same seq, so a coordinator that has it drops it)
    sender.send(Task("run", 1, sha, ("dev0",), 60.0, 1e-2, "none", steps=1))
    assert agent.run(stop_after_s=0.5) == 0
    again = listener.receive(0.0)
    assert again is not None and encode(again.message) == encode(updates[0]) and listener.receive(0.0) is None
    one.close()


def test_a_task_that_starts_from_the_bundles_own_values_needs_no_full_global(tmp_path, tmp_path_factory):
    # Prepare: round 0's task names the hash of what the bundle holds; no global is ever published
    from edgeftl.device.protocol.messages import Task, Update, params_sha256

    one = _one_device(tmp_path, tmp_path_factory)
    agent, listener, sender = one.agent, one.listener, one.sender
    start = params_sha256(agent.runtime.get_flat())
    # Execute
    sender.send(Task("run", 0, one.sha, ("dev0",), 60.0, 1e-2, "none", steps=1, start_sha256=start))
    sent = agent.run(max_rounds=1, stop_after_s=60)
    # Assert: trained at once from the bundle's values (the global of round -1), nothing downloaded
    replies = [listener.receive(0.0) for _ in range(3)]
    updates = [r.message for r in replies if r is not None and isinstance(r.message, Update)]
    assert sent == 1 and agent.global_round == -1 and agent.run_id == "run"
    assert len(updates) == 1 and updates[0].round == 0
    assert updates[0].metrics["bytes_down"] < 1000  # the task only, no 4-bytes-per-parameter vector
    # ... and its metrics carry nothing the coordinator sees itself (each key costs header bytes)
    assert not {"samples", "update_bytes", "rss_mib"} & set(updates[0].metrics)
    assert {"first_loss", "last_loss", "train_time_s", "peak_rss_mib"} <= set(updates[0].metrics)
    # ... while another hash (a run resumed from trained values) still waits for the full vector
    sender.send(Task("run2", 0, one.sha, ("dev0",), 60.0, 1e-2, "none", steps=1, start_sha256="0" * 64))
    assert agent.run(stop_after_s=0.5) == 0 and agent.waiting is not None
    one.close()


def test_a_device_answers_in_the_compact_framing_only_when_the_task_says_the_coordinator_reads_it(
        tmp_path, tmp_path_factory):
    # Prepare: a raw subscriber sees the bytes of the device's replies; the first task leaves `framing`
    # out (a coordinator that reads only version 1), the second says 2, the third fails training
    from edgeftl.device.protocol import wire
    from edgeftl.device.protocol.messages import ErrorReply, Task, Update, decode, params_sha256

    one = _one_device(tmp_path, tmp_path_factory)
    agent, sender = one.agent, one.sender
    raw: list[bytes] = []
    tap = InProcessConnection(one.broker, "tap")
    tap.on_frame = lambda topic, frame: raw.append(frame) if "/update/" in topic else None
    tap.connect()
    tap.subscribe(["edgeftl/update/#"])
    start = params_sha256(agent.runtime.get_flat())
    # Execute: version 1, then 2, then an error reply under 2
    sender.send(Task("run", 0, one.sha, ("dev0",), 60.0, 1e-2, "sign", steps=1, start_sha256=start))
    agent.run(max_rounds=1, stop_after_s=60)
    sender.send(Task("run2", 0, one.sha, ("dev0",), 60.0, 1e-2, "sign", steps=1, start_sha256=start, framing=2))
    agent.run(max_rounds=1, stop_after_s=60)
    agent.runtime.accumulate = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
    sender.send(Task("run3", 0, one.sha, ("dev0",), 60.0, 1e-2, "sign", steps=1, start_sha256=start, framing=7))
    agent.run(stop_after_s=0.5)  # an error reply is no update: max_rounds would not count it
    # Assert: the same kind of update, one version each; the compact one is ~180 bytes shorter, and
    # a framing newer than any this device writes gets the newest it does (2)
    assert [frame[4] for frame in raw] == [1, 2, 2]
    first, second, error = (decode(frame, 1 << 20) for frame in raw)
    assert isinstance(first, Update) and isinstance(second, Update) and isinstance(error, ErrorReply)
    assert first.vector.codec == second.vector.codec and len(raw[0]) - len(raw[1]) > 150
    assert wire.decode_message(raw[1], 1 << 20)[0]["kind"] == "update"
    one.close()


def test_coordinator_tasks_name_the_framing_it_reads(tmp_path):
    # Prepare / Execute: a default config, one asking for version 1, and a bad value
    default = CoordinatorConfig(out=tmp_path / "a")
    oldest = CoordinatorConfig(out=tmp_path / "b", framing=1)
    # Assert: 2 unless told otherwise; an unknown version is refused in one line naming the accepted ones
    assert (default.framing, oldest.framing) == (2, 1)
    with pytest.raises(ValueError, match="--framing must be one of 1, 2"):
        CoordinatorConfig(out=tmp_path / "c", framing=3)


def test_a_restarted_device_answers_the_retained_start_task_again_without_retraining(tmp_path, tmp_path_factory):
    # Prepare: a device answered round 0, whose task starts from the bundle's own values, then restarts
    # (a new process: only its saved state remembers the reply) and the retained task comes again
    from edgeftl.device.protocol.messages import Task, Update, encode, params_sha256

    one = _one_device(tmp_path, tmp_path_factory, state_dir=tmp_path / "state")
    task = Task("run", 0, one.sha, ("dev0",), 60.0, 1e-2, "none", steps=1,
                start_sha256=params_sha256(one.agent.runtime.get_flat()))
    one.sender.send(task)
    assert one.agent.run(max_rounds=1, stop_after_s=60) == 1

    def updates() -> list[Update]:  # what reached the coordinator's side, statuses left out
        items = [one.listener.receive(0.0) for _ in range(8)]
        return [i.message for i in items if i is not None and isinstance(i.message, Update)]

    (first,) = updates()
    config = one.agent.config
    one.agent.close()
    restarted = DeviceAgent(device_link(one.broker, "dev0"), config)
    restarted.start()
    # Execute: the retained task reaches the restarted device when it subscribes
    sent = restarted.run(stop_after_s=0.5)
    # Assert: the saved reply went out again, unchanged (same seq: a coordinator that has it drops it);
    # retraining would have sent another update and broken error feedback
    assert sent == 0 and [encode(u) for u in updates()] == [encode(first)]
    restarted.close()
    one.listener.close()


def test_a_task_whose_global_never_arrives_gets_a_no_global_reply(tmp_path, tmp_path_factory, monkeypatch):
    # Prepare: an agent that holds no global of the run its task belongs to, and a short wait
    from edgeftl.device import agent as agent_module
    from edgeftl.device.protocol.messages import ErrorReply, Task

    monkeypatch.setattr(agent_module, "GLOBAL_WAIT_S", 0.3)
    one = _one_device(tmp_path, tmp_path_factory)
    agent, listener, sender = one.agent, one.listener, one.sender
    # Execute
    sender.send(Task("run", 4, one.sha, ("dev0",), 60.0, 1e-2, "none", steps=1))
    sent = agent.run(stop_after_s=1.5)
    # Assert
    replies = [listener.receive(0.0) for _ in range(3)]
    errors = [r.message for r in replies if r is not None and isinstance(r.message, ErrorReply)]
    assert sent == 0 and len(errors) == 1 and errors[0].code == "no_global" and errors[0].round == 4
    one.close()


def test_a_device_whose_parameters_drift_from_the_coordinators_fetches_the_full_global(tmp_path, tmp_path_factory):
    # Prepare: an agent holding round 0, whose copy then drifts (as a float64 implementation's would)
    from edgeftl.device.protocol.codecs import Encoded
    from edgeftl.device.protocol.messages import Global, params_sha256

    one = _one_device(tmp_path, tmp_path_factory)
    agent, sender, sha, truth = one.agent, one.sender, one.sha, one.agent.runtime.get_flat()
    agent._resync()  # catching up, as a task or delta it cannot start from makes it do
    sender.send(Global("run", 0, sha, Encoded("none", truth.size, {"values": truth})))
    agent.run(stop_after_s=0.3)
    assert agent.global_round == 0
    agent.reference = agent.reference + np.float32(1e-7)
    # Execute: round 1's delta (zero) with the hash of the coordinator's parameters, and its full vector
    zero = np.zeros_like(truth)
    sender.send(Global("run", 1, sha, Encoded("none", truth.size, {"values": truth}), None))
    sender.send(Global("run", 1, sha, Encoded("none", truth.size, {"values": zero}), 0, params_sha256(truth)))
    agent.run(stop_after_s=0.5)
    # Assert: the delta was refused by its hash and the retained full vector taken instead
    assert agent.global_round == 1 and np.array_equal(agent.reference, truth)
    one.close()


def test_a_device_whose_training_fails_replies_with_an_error_and_the_round_goes_on(tmp_path, tmp_path_factory):
    # Prepare: 3 devices; dev1 runs out of memory in every training pass (as ORT reports it)
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest = read_manifest(folder)
    files = _device_files(tmp_path, 3, 16)
    broker = InProcessBroker()
    agents, threads = in_process_devices(broker, folder, files, rounds=1, stop_after_s=20)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("Failed to allocate memory for requested buffer of size 50331648")

    agents[1].runtime.accumulate = out_of_memory
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, steps=2, batch=8, deadline_s=120, wait_devices=3,
                               wait_devices_s=10)
    coordinator = Coordinator(coordinator_link(broker, "coordinator"), folder, manifest,
                              agents[0].runtime.get_flat(), config)
    for t in threads:
        t.start()
    # Execute
    coordinator.connect()
    assert coordinator.wait_for_devices() == 3
    record = coordinator.run_round(0)
    # Assert: two updates aggregated, dev1's failure recorded with its code; no wait for the deadline
    assert record["updates_received"] == 2 and record["aggregated"] and record["updates_rejected"] == 0
    assert record["updates_failed"] == 1 and set(record["failures"]) == {"dev1"}
    assert record["failures"]["dev1"]["code"] == "out_of_memory"
    assert "Failed to allocate memory" in record["failures"]["dev1"]["reason"]
    assert record["wall_s"] < config.deadline_s  # it ended when every sampled device had replied
    assert isinstance(record["close_s"], float) and record["close_s"] >= 0  # closing, timed apart from the wait


def test_error_replies_are_checked_like_updates(tmp_path):
    # Prepare: an inbox whose round 3 sampled dev0 and dev1
    from edgeftl.coordinator.rounds.inbox import DeviceFailure, Inbox
    from edgeftl.device.protocol.messages import ErrorReply

    inbox = Inbox("run", "b" * 64, 10)
    inbox.open_round(3, ["dev0", "dev1"])

    def reply(device: str, round_index: int = 3, run: str = "run"):
        return inbox.take(ErrorReply(run, round_index, "b" * 64, device, "train_failed", "ValueError: bad data"), 200)

    # Execute
    first = reply("dev0")
    again = reply("dev0")  # QoS 1 redelivery: dropped quietly
    others = [reply("intruder"), reply("dev1", run="other"), reply("dev1", round_index=2)]
    # Assert: not sampled, another federation, an old round
    assert first == DeviceFailure("dev0", "train_failed", "ValueError: bad data")
    assert again is None and others == [None, None, None] and inbox.redelivered == 1
    assert inbox.failures == {"dev0": {"code": "train_failed", "reason": "ValueError: bad data"}}
    counted = inbox.close_round()
    assert counted.late == 1 and counted.redelivered == 1 and counted.rejected_places == {"update": 2}
    assert counted.rejected == {"unknown device": 1, "wrong run or bundle": 1}


def test_lossy_downlink_devices_hold_exactly_the_coordinators_reference(tmp_path, tmp_path_factory):
    # Prepare: int8 global deltas with server-side error feedback (what `make demo` uses)
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest = read_manifest(folder)
    broker = InProcessBroker()
    agents, threads = in_process_devices(broker, folder, _device_files(tmp_path, 2, 32), rounds=3)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=3, steps=4, batch=16, lr=2e-2, deadline_s=60,
                               downlink="int8", wait_devices=2, wait_devices_s=10)
    coordinator = Coordinator(coordinator_link(broker, "coordinator"), folder, manifest,
                              agents[0].runtime.get_flat(), config)
    published: dict[int, np.ndarray] = {}
    publish = coordinator._publish_global

    def spy(round_index: int, delta) -> int:  # the reference devices should hold after each round's global
        published[round_index] = coordinator.reference.copy()
        return publish(round_index, delta)

    coordinator._publish_global = spy
    for t in threads:
        t.start()
    # Execute
    coordinator.connect()
    coordinator.wait_for_devices()
    records = coordinator.run()
    for t in threads:
        t.join(timeout=30)
    # Assert: every device decoded the same vector the coordinator will diff the next round against
    assert all(agent.global_round is not None for agent in agents)
    for agent in agents:
        assert np.array_equal(agent.reference, published[agent.global_round])
    # ... which is lossy (int8) but tracks the aggregate: the residual stays in the feedback, not the model
    drift = np.abs(coordinator.params - coordinator.reference).max()
    assert 0 < drift < 0.02 * np.abs(coordinator.params).max()
    fp32 = 4 * manifest.trainable_count
    assert all(r["bytes_down"] / r["updates_received"] < fp32 / 2 for r in records[1:])  # int8 deltas, per device


def test_a_task_beyond_the_devices_limits_gets_an_error_reply_not_hours_of_training(tmp_path, tmp_path_factory):
    # Prepare: a task asking for 100,000 steps (within the protocol's bounds, above the device's 1000)
    from edgeftl.device.protocol.codecs import Encoded
    from edgeftl.device.protocol.messages import ErrorReply, Global, Task

    one = _one_device(tmp_path, tmp_path_factory)
    agent, listener, sender, sha = one.agent, one.listener, one.sender, one.sha
    reference = agent.runtime.get_flat()
    sender.send(Global("run", 0, sha, Encoded("none", reference.size, {"values": reference})))
    sender.send(Task("run", 1, sha, ("dev0",), 60.0, 1e-2, "none", steps=100_000))
    # Execute
    sent = agent.run(stop_after_s=1.0)
    # Assert: no training, one error reply naming the limit, and the round counts as answered
    replies = [r.message for r in (listener.receive(0.2) for _ in range(3)) if r is not None]
    errors = [m for m in replies if isinstance(m, ErrorReply)]
    assert sent == 0 and len(errors) == 1 and errors[0].code == "task_limits"
    assert "steps=100000" in errors[0].reason and "--max-steps" in errors[0].reason
    assert agent.acted == ("run", 1)
    one.close()
