"""Faults with real processes: the `edgeftl coordinator` and `edgeftl device run` CLIs as
subprocesses against real Mosquitto, killed with SIGKILL at deterministic points.

A failpoint (device/failpoint.py: EDGEFTL_FAILPOINT=<name>:<round>) makes a process print a marker
line and pause where the test kills it. After each fault the run must end with one record per
round (0..N-1), the checkpoint at the last record's round, every delivered update aggregated
once, and no device training a round twice (its persisted update counter `seq`). Each test
starts 3-4 processes with a tiny bundle and took 2-8 s here, so none is marked slow.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeftl.coordinator.rounds import checkpoint
from edgeftl.device.agent import AGENT_STATE
from edgeftl.device.data import write_csv
from edgeftl.device.failpoint import ENV, MARKER
from edgeftl.device.link import Incoming, Link, MqttConnection
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest
from edgeftl.device.protocol.messages import Update
from edgeftl.device.protocol.topics import Topics

from conftest import _accepts, _free_port, _stop, mosquitto_binary
from fixtures_build import bundle, keyword_dataset

DEADLINE_S = 600  # far beyond any round here: a round that ends did not wait for its deadline
WAIT_S = 300  # the most a step of a test waits for a process


class Run:
    """One federation's processes (coordinator, devices) and their logs, all killed at the end."""

    def __init__(self, tmp: Path, folder: Path, url: str) -> None:
        self.tmp, self.folder, self.url = tmp, folder, url
        self.prefix, self.out = f"crash-{uuid.uuid4().hex[:8]}", tmp / "run"
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, argv: list[str], failpoint: str | None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if failpoint:
            env[ENV] = failpoint
        log = open(self.tmp / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "edgeftl.device.cli", *argv], stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
        self.processes.append(process)
        return process

    def coordinator(self, *flags: str, failpoint: str | None = None, rounds: int = 2,
                    devices: int = 2) -> subprocess.Popen:
        return self._start("coordinator", [
            "coordinator", "--broker", self.url, "--bundle", str(self.folder), "--out", str(self.out),
            "--prefix", self.prefix, "--rounds", str(rounds), "--steps", "2", "--batch", "8",
            "--deadline-s", str(DEADLINE_S), "--wait-devices", str(devices), "--wait-devices-s", str(WAIT_S),
            *flags], failpoint)

    def device(self, name: str, failpoint: str | None = None) -> subprocess.Popen:
        data = write_csv(self.tmp / f"{name}.csv", *keyword_dataset(16, seed=len(name) + ord(name[-1])))
        return self._start(name, [
            "device", "run", "--broker", self.url, "--bundle", str(self.folder), "--data", str(data), "--id", name,
            "--prefix", self.prefix, "--state", str(self.tmp / f"{name}-state"), "--threads", "1"], failpoint)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_for_marker(self, name: str, process: subprocess.Popen) -> None:
        end = time.monotonic() + WAIT_S
        while MARKER not in self.log(name):
            assert process.poll() is None and time.monotonic() < end, self.log(name)[-3000:]
            time.sleep(0.1)

    def finish(self, process: subprocess.Popen) -> None:
        """Wait for the coordinator to end by itself."""
        assert process.wait(timeout=WAIT_S) == 0, self.log("coordinator")[-3000:]

    def records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def checkpoint_round(self) -> int:
        size = read_manifest(self.folder).trainable_count
        return checkpoint.load(self.out, size, bundle_sha256(self.folder))[0]

    def trained(self, name: str) -> int:
        """Updates the device trained and sent (its persisted seq; a resend keeps the seq)."""
        with np.load(self.tmp / f"{name}-state" / AGENT_STATE) as state:
            return int(state["seq"])

    def assert_consistent(self, rounds: int) -> list[dict]:
        """One record per round 0..rounds-1, and the checkpoint at the last."""
        records = self.records()
        assert [r["round"] for r in records] == list(range(rounds)), records
        assert self.checkpoint_round() == rounds - 1
        return records

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory, "bert-int8")


@pytest.fixture
def run(mosquitto_broker, tiny, tmp_path) -> Iterator[Run]:
    host, port = mosquitto_broker
    federation = Run(tmp_path, tiny, f"mqtt://{host}:{port}")
    yield federation
    federation.kill_all()


def _show(records: list[dict]) -> None:
    for r in records:
        print(f"round {r['round']}: {r['updates_received']}/{r['devices_selected']} updates, "
              f"{r['updates_failed']} failed {r['failures']}, {r['updates_rejected']} rejected, "
              f"{r['updates_late']} late, wall {r['wall_s']} s")


def test_coordinator_killed_after_delivery_resumes_with_the_delivered_updates(run: Run) -> None:
    # Prepare: two devices; the coordinator pauses in round 1 after both delivered, before its checkpoint
    devices = [run.device("dev0"), run.device("dev1")]
    first = run.coordinator(failpoint="before_checkpoint:1")
    run.wait_for_marker("coordinator", first)
    # Execute: SIGKILL there, then --resume
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert [r["round"] for r in run.records()] == [0] and run.checkpoint_round() == 0
    run.finish(run.coordinator("--resume"))
    # Assert: round 1 aggregated both updates delivered before the kill; nobody trained it twice
    records = run.assert_consistent(2)
    _show(records)
    assert all(r["updates_received"] == 2 and r["updates_failed"] == 0 and r["updates_rejected"] == 0
               for r in records)
    assert [run.trained("dev0"), run.trained("dev1")] == [2, 2]
    assert all(p.poll() is None for p in devices)  # still serving: the kill was the coordinator's only


def test_coordinator_killed_right_after_a_checkpoint_keeps_that_rounds_record(run: Run) -> None:
    # Prepare
    run.device("dev0"), run.device("dev1")
    first = run.coordinator(failpoint="after_checkpoint:0")
    run.wait_for_marker("coordinator", first)
    # Execute: killed with round 0 checkpointed, its record not yet in metrics.jsonl
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert run.records() == [] and run.checkpoint_round() == 0
    run.finish(run.coordinator("--resume"))
    # Assert: round 0's record restored from the checkpoint, once; round 1 ran from round 0's global
    records = run.assert_consistent(2)
    _show(records)
    assert all(r["updates_received"] == 2 and r["updates_rejected"] == 0 for r in records)
    assert [run.trained("dev0"), run.trained("dev1")] == [2, 2]


def test_a_device_killed_mid_round_ends_the_round_with_its_will(run: Run) -> None:
    # Prepare: dev1 pauses in round 0 before training
    run.device("dev0")
    victim = run.device("dev1", failpoint="before_train:0")
    coordinator = run.coordinator(rounds=1)
    run.wait_for_marker("dev1", victim)
    # Execute
    victim.send_signal(signal.SIGKILL)
    run.finish(coordinator)
    # Assert: dev0's update aggregated, dev1 counted offline, the round ended long before its deadline
    (record,) = run.assert_consistent(1)
    _show([record])
    assert record["updates_received"] == 1 and record["aggregated"]
    assert record["updates_failed"] == 1 and record["failures"]["dev1"]["code"] == "offline"
    assert record["wall_s"] < DEADLINE_S


def _broker(folder: Path, port: int, persistence: bool) -> subprocess.Popen:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed: run `make mosquitto`")
    conf = folder / "mosquitto.conf"
    # autosave after every change: a SIGKILLed broker keeps every session and retained message; run
    # as ourselves (as root, mosquitto would switch to user mosquitto, who cannot write our tmp folder)
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\nuser {getpass.getuser()}\n"
                    + (f"persistence true\npersistence_location {folder}/\nautosave_interval 1\n"
                       "autosave_on_changes true\n" if persistence else "persistence false\n"))
    with open(folder / "mosquitto.log", "ab") as log:
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 10
    while not _accepts(port):
        assert process.poll() is None and time.monotonic() < end, (folder / "mosquitto.log").read_text()
        time.sleep(0.05)
    return process


def _watch_updates(url: str, prefix: str, round_index: int, devices: int) -> None:
    """Return once `devices` updates of round_index went through the broker (seen as a bystander)."""
    topics = Topics(prefix)
    watcher = Link(MqttConnection(url, f"watch-{uuid.uuid4().hex[:8]}", clean_start=True), prefix,
                   [topics.updates_filter])
    watcher.connect()
    senders: set[str] = set()
    end = time.monotonic() + WAIT_S
    try:
        while len(senders) < devices:
            assert time.monotonic() < end, f"saw updates of round {round_index} from {senders} only"
            item = watcher.receive(timeout_s=0.2)
            if isinstance(item, Incoming) and isinstance(item.message, Update) and item.message.round == round_index:
                senders.add(item.message.device_id)
    finally:
        watcher.close(abrupt=True)


def _restart(broker: subprocess.Popen, folder: Path, port: int, persistence: bool) -> subprocess.Popen:
    broker.send_signal(signal.SIGKILL)
    broker.wait(timeout=30)
    return _broker(folder, port, persistence)


@pytest.mark.parametrize("persistence", [True, False], ids=["persistence", "no-persistence"])
def test_broker_killed_and_restarted_mid_round_loses_no_update(persistence: bool, tiny, tmp_path) -> None:
    # Prepare: our own broker; both devices pause in round 1 before training (the round is open)
    port = _free_port()
    broker = _broker(tmp_path, port, persistence)
    run = Run(tmp_path, tiny, f"mqtt://127.0.0.1:{port}")
    try:
        devices = {name: run.device(name, failpoint="before_train:1") for name in ("dev0", "dev1")}
        coordinator = run.coordinator()
        for name, process in devices.items():
            run.wait_for_marker(name, process)
        assert [r["round"] for r in run.records()] == [0]
        # Execute: SIGKILL the broker, restart it on the same port, let the devices train and send
        broker = _restart(broker, tmp_path, port, persistence)
        for process in devices.values():
            process.send_signal(signal.SIGUSR1)
        run.finish(coordinator)
        # Assert: both updates of round 1 aggregated, nobody trained twice
        records = run.assert_consistent(2)
        _show(records)
        assert all(r["updates_received"] == 2 and r["updates_failed"] == 0 for r in records)
        assert [run.trained("dev0"), run.trained("dev1")] == [2, 2]
    finally:
        run.kill_all()
        _stop(broker)


def test_updates_held_by_a_persistent_broker_survive_its_crash_and_the_coordinators(tiny, tmp_path) -> None:
    # Prepare: both devices pause in round 1 before training; then the coordinator is killed, so
    # what they send next waits in the broker, queued for the coordinator's persistent session
    port = _free_port()
    broker = _broker(tmp_path, port, persistence=True)
    run = Run(tmp_path, tiny, f"mqtt://127.0.0.1:{port}")
    try:
        devices = {name: run.device(name, failpoint="before_train:1") for name in ("dev0", "dev1")}
        first = run.coordinator()
        for name, process in devices.items():
            run.wait_for_marker(name, process)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        for process in devices.values():
            process.send_signal(signal.SIGUSR1)
        _watch_updates(run.url, run.prefix, 1, 2)
        for process in devices.values():  # from now on the broker's store is the updates' only copy
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        # Execute: the broker crashes with those updates queued, restarts from its store; --resume
        broker = _restart(broker, tmp_path, port, persistence=True)
        run.finish(run.coordinator("--resume", "--wait-devices-s", "5"))  # no device comes back
        # Assert: round 1 aggregated the two updates only the broker's store held
        records = run.assert_consistent(2)
        _show(records)
        assert all(r["updates_received"] == 2 and r["updates_failed"] == 0 for r in records)
        assert [run.trained("dev0"), run.trained("dev1")] == [2, 2]
    finally:
        run.kill_all()
        _stop(broker)
