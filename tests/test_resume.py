"""Resume and fault handling in one process: checkpoints that cannot be resumed are refused in one
line, records and checkpoint agree after a kill, a resumed round keeps the replies it had, a will
ends the wait for its device, and a device with another bundle says so.

The same faults with real processes killed by SIGKILL are in test_crash.py.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeftl.coordinator.rounds import checkpoint, journal, loop
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.agent import AgentConfig, DeviceAgent
from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest
from edgeftl.device.runtime import trainable_vector

from fixtures_build import bundle, coordinator_link, device_link, keyword_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory, "bert-int8")


def _data(tmp: Path, name: str) -> Path:
    return write_csv(tmp / f"{name}.csv", *keyword_dataset(16, seed=hash(name) % 1000))


def _coordinator_cli(folder: Path, out: Path, *flags: str) -> list[str]:
    # port 1: nothing listens there, so a run that got past its checks would fail to connect
    return ["coordinator", "--broker", "mqtt://127.0.0.1:1", "--bundle", str(folder), "--out", str(out), *flags]


def _valid_checkpoint(folder: Path, out: Path, round_index: int = 0) -> np.ndarray:
    params = trainable_vector(folder, read_manifest(folder))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out, round_index, params, params, {}, {"run_id": "r1", "bundle_sha256": bundle_sha256(folder)},
                    {"format": 1, "round": round_index})
    return params


def _corrupt(kind: str, folder: Path, out: Path) -> None:
    path = out / checkpoint.CHECKPOINT
    if kind == "missing":
        out.mkdir(parents=True)
        return
    params = _valid_checkpoint(folder, out)
    sha = bundle_sha256(folder)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "wrong length":
        checkpoint.save(out, 0, params[:-3], params[:-3], {}, {"run_id": "r1", "bundle_sha256": sha})
    elif kind == "non-finite":
        bad = params.copy()
        bad[5] = np.inf
        checkpoint.save(out, 0, bad, params, {}, {"run_id": "r1", "bundle_sha256": sha})
    elif kind == "other bundle":
        checkpoint.save(out, 0, params, params, {}, {"run_id": "r1", "bundle_sha256": "0" * 64})


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random bytes", "wrong length", "non-finite",
                                  "other bundle"])
def test_resume_refuses_an_unusable_checkpoint_in_one_line(kind, tiny, tmp_path, capsys):
    # Prepare
    out = tmp_path / "run"
    _corrupt(kind, tiny, out)
    # Execute
    rc = main(_coordinator_cli(tiny, out, "--resume"))
    # Assert: one line naming the file and what to do; no traceback, no pickle hint
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert err[0].startswith("edgeftl: error:") and "checkpoint.npz" in err[0] and "Traceback" not in err[0]
    assert any(hint in err[0] for hint in ("--resume", "--force", "--out")) and "allow_pickle" not in err[0]
    print(f"{kind}: {err[0]}")


@pytest.mark.parametrize("leftover", [checkpoint.CHECKPOINT, "metrics.jsonl"])
def test_a_new_run_into_a_used_out_is_refused_unless_forced(leftover, tiny, tmp_path, capsys):
    # Prepare: an --out holding another run's checkpoint or records
    out = tmp_path / "run"
    _valid_checkpoint(tiny, out)
    if leftover == "metrics.jsonl":
        (out / checkpoint.CHECKPOINT).rename(out / "metrics.jsonl")
    # Execute
    rc = main(_coordinator_cli(tiny, out))
    # Assert: refused in one line, nothing touched; --force clears it (then fails to connect to port 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--force" in err[0] and "already holds" in err[0], err
    assert (out / leftover).exists()
    manifest = read_manifest(tiny)
    Coordinator(coordinator_link(InProcessBroker()), tiny, manifest, trainable_vector(tiny, manifest),
                CoordinatorConfig(out=out, force=True))
    assert not (out / leftover).exists()


def test_reconcile_appends_the_checkpointed_record_once_and_drops_a_cut_line(tmp_path):
    # Prepare: records of rounds 0 and 1, then a line cut by a kill; the checkpoint is of round 2
    out = tmp_path / "run"
    out.mkdir()
    lines = [json.dumps({"format": 1, "round": r}) + "\n" for r in (0, 1)]
    (out / "metrics.jsonl").write_text("".join(lines) + '{"format": 1, "rou')
    meta = {"round": 2, "record": {"format": 1, "round": 2, "updates_received": 3}}
    # Execute: twice, as two resumes in a row would
    appended = [checkpoint.reconcile_records(out, meta), checkpoint.reconcile_records(out, meta)]
    # Assert
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert appended == [1, 0] and rounds == [0, 1, 2]


class _Crash(Exception):
    """Stands in for SIGKILL at a failpoint (the real kill is in test_crash.py)."""


def test_a_resumed_round_keeps_the_updates_delivered_before_the_crash(tiny, tmp_path, monkeypatch):
    # Prepare: two devices; the coordinator "dies" in round 1 after both delivered, before its checkpoint
    broker = InProcessBroker()
    agents = [DeviceAgent(device_link(broker, f"dev{i}"), AgentConfig(f"dev{i}", tiny, _data(tmp_path, f"d{i}"),
                                                                       threads=1)) for i in range(2)]
    sent: list[int] = []
    for agent in agents:
        agent.start()
    threads = [threading.Thread(target=lambda a=a: sent.append(a.run(stop_after_s=90, max_rounds=2)), daemon=True)
               for a in agents]
    for t in threads:
        t.start()
    out = tmp_path / "run"
    config = dict(out=out, rounds=2, steps=2, deadline_s=600, wait_devices=2, wait_devices_s=20, run_id="r1")

    def crash_at(name: str, round_index: int) -> None:
        if (name, round_index) == ("before_checkpoint", 1):
            raise _Crash

    monkeypatch.setattr(loop, "failpoint", crash_at)
    first = Coordinator(coordinator_link(broker, "coord-a"), tiny, read_manifest(tiny), agents[0].reference,
                        CoordinatorConfig(**config))
    first.connect()
    first.wait_for_devices()
    with pytest.raises(_Crash):
        first.run()
    first.link.close(abrupt=True)
    journaled = journal.read(out, "r1", 1)
    # Execute: resume
    monkeypatch.setattr(loop, "failpoint", lambda name, round_index: None)
    second = Coordinator(coordinator_link(broker, "coord-b"), tiny, read_manifest(tiny), agents[0].reference,
                         CoordinatorConfig(**config, resume=True))
    second.connect()
    second.wait_for_devices()
    records = second.run()
    for t in threads:
        t.join(timeout=60)
    # Assert: round 1 aggregated both journaled updates; no device trained round 1 twice
    assert journaled is not None and len(journaled.updates) == 2
    assert [r["round"] for r in records] == [1] and records[0]["updates_received"] == 2
    assert records[0]["updates_rejected"] == 0 and sorted(sent) == [2, 2]
    assert not (out / journal.FOLDER).exists()
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1] and checkpoint.load(out, second.params.size, second.bundle_sha256)[0] == 1


def test_a_will_ends_the_wait_for_its_device(tiny, tmp_path):
    # Prepare: dev0 trains; dev1 is online but never answers, then its connection dies
    broker = InProcessBroker()
    agent = DeviceAgent(device_link(broker, "dev0"), AgentConfig("dev0", tiny, _data(tmp_path, "d0"), threads=1))
    agent.start()
    silent = device_link(broker, "dev1")
    silent.connect()
    coordinator = Coordinator(coordinator_link(broker), tiny, read_manifest(tiny), agent.reference,
                              CoordinatorConfig(out=tmp_path / "run", rounds=1, steps=1, deadline_s=600,
                                                wait_devices=2, wait_devices_s=20))
    coordinator.connect()
    assert coordinator.wait_for_devices() == 2
    worker = threading.Thread(target=agent.run, kwargs={"stop_after_s": 60, "max_rounds": 1}, daemon=True)
    worker.start()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(coordinator.run_round(0)), daemon=True)
    runner.start()
    worker.join(60)
    # Execute: dev1 vanishes (a crash: the broker publishes its will)
    silent.close(abrupt=True)
    runner.join(60)
    # Assert: the round ended on the will, long before its 600 s deadline
    assert not runner.is_alive() and result["updates_received"] == 1 and result["updates_failed"] == 1
    assert result["failures"]["dev1"]["code"] == "offline" and result["wall_s"] < 600


def test_a_device_with_another_bundle_says_so(tiny, tmp_path):
    # Prepare: the coordinator's bundle differs from the device's by its manifest bytes
    other = tmp_path / "other-bundle"
    shutil.copytree(tiny, other)
    (other / "manifest.json").write_bytes((tiny / "manifest.json").read_bytes() + b"\n")
    broker = InProcessBroker()
    agent = DeviceAgent(device_link(broker, "dev0"), AgentConfig("dev0", tiny, _data(tmp_path, "d0"), threads=1))
    agent.start()
    coordinator = Coordinator(coordinator_link(broker), other, read_manifest(tiny), agent.reference,
                              CoordinatorConfig(out=tmp_path / "run", rounds=1, deadline_s=60, wait_devices_s=20))
    coordinator.connect()
    assert coordinator.wait_for_devices() == 1
    worker = threading.Thread(target=agent.run, kwargs={"stop_after_s": 5}, daemon=True)
    worker.start()
    # Execute
    record = coordinator.run_round(0)
    # Assert: an error reply the coordinator took and recorded, naming both hashes
    failure = record["failures"]["dev0"]
    assert record["updates_failed"] == 1 and record["updates_rejected"] == 0 and failure["code"] == "bundle_mismatch"
    assert bundle_sha256(tiny) in failure["reason"] and bundle_sha256(other) in failure["reason"]
    assert record["wall_s"] < 60  # ended by the reply, not the deadline
    worker.join(10)


def test_a_restarted_device_sends_its_saved_update_again_instead_of_retraining(tiny, tmp_path):
    # Prepare: a device with a state folder answers round 1, then its process "dies" (abrupt close)
    from edgeftl.device.link import InProcessConnection, Link
    from edgeftl.device.protocol.codecs import Encoded
    from edgeftl.device.protocol.messages import Global, Task, Update, encode

    broker, data, state = InProcessBroker(), _data(tmp_path, "d0"), tmp_path / "state"
    listener = coordinator_link(broker, "listener")
    listener.connect()
    sender = Link(InProcessConnection(broker, "sender"), "edgeftl", [])
    sender.connect()
    sha = bundle_sha256(tiny)
    start = trainable_vector(tiny, read_manifest(tiny))
    sender.send(Global("r1", 0, sha, Encoded("none", start.size, {"values": start})))
    sender.send(Task("r1", 1, sha, ("dev0",), 60.0, 1e-2, "int8", steps=1))

    def device() -> DeviceAgent:
        agent = DeviceAgent(device_link(broker, "dev0"), AgentConfig("dev0", tiny, data, state_dir=state, threads=1))
        agent.start()
        return agent

    first = device()
    assert first.run(stop_after_s=20, max_rounds=1) == 1
    first.link.close(abrupt=True)
    # Execute: restarted, it finds the retained task of round 1 again
    second = device()
    sent = second.run(stop_after_s=2)
    second.close()
    # Assert: no training (0 sent), and the same update (same seq) went out again
    updates = []
    while (item := listener.receive(0.0)) is not None:
        if isinstance(item.message, Update):
            updates.append(encode(item.message))
    assert sent == 0 and len(updates) == 2 and updates[0] == updates[1]
