"""The device card and `edgeftl fleet status`: a status's `info` within its bounds, the card a
device link announces (birth, clean close, will), the table, and the whole path through real
Mosquitto with real `edgeftl device run` and `edgeftl coordinator` processes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeftl.coordinator.fleet.status import count_line, read_statuses, row_of, rows_of, table
from edgeftl.device.card import device_card, with_progress
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker, InProcessConnection, Link, MqttConnection
from edgeftl.device.protocol import wire
from edgeftl.device.protocol.auth import Keys
from edgeftl.device.protocol.manifest import bundle_sha256
from edgeftl.device.protocol.messages import MessageError, Status, decode, encode, status_from_payload
from edgeftl.device.protocol.topics import Topics

from fixtures_build import bundle, keyword_dataset

SHA = "ab" * 32
CARD = {"platform_machine": "x86_64", "platform_python": "3.11.7", "onnxruntime": "1.32.0",
        "edgeftl_version": "0.3.0", "bundle_sha256": SHA, "package_id": "0123456789abcdef", "started": 1_800_000_000,
        "peak_rss_mib": 212.4, "rounds_done": 1, "last_round": 4}
WAIT_S = 120  # the most a step of the process test waits


# ---- Status info: the wire rule ------------------------------------------------------------


def test_a_status_with_info_round_trips_and_one_without_encodes_as_before() -> None:
    # Prepare
    with_card, bare = Status("dev-1", True, dict(CARD)), Status("dev-1", False)
    before = wire.encode_message({"kind": "status", "format": 1, "device_id": "dev-1", "state": "offline"}, {})
    # Execute
    decoded = decode(encode(with_card), 1 << 20)
    # Assert
    assert decoded == with_card
    assert encode(bare) == before
    assert decode(before, 1 << 20) == bare


@pytest.mark.parametrize(("info", "why"), [
    ({f"k{i}": i for i in range(65)}, "65 entries"),
    ({"k": "x" * 257}, "a 257-character string"),
    ({f"k{i}": "x" * 250 for i in range(20)}, "over 4096 bytes as JSON"),
    ({"k": float("nan")}, "NaN"),
    ({"k": 2**53}, "an integer beyond 2**53 - 1"),
    ({"k": {"nested": 1}}, "a nested object"),
    ({"k": [1, 2]}, "a list"),
    ({"k": True}, "a boolean"),
    ({"k": None}, "null"),
    ({"a key": 1}, "a key with a space"),
    ({"k": "line\nbreak"}, "a string that is not printable"),
])
def test_a_status_info_outside_its_bounds_is_refused_with_one_line(info: dict, why: str) -> None:
    # Prepare: the header as a hostile device would write it (encode() refuses it too)
    header = {"kind": "status", "format": 1, "device_id": "dev-1", "state": "online", "info": info}
    payload = wire.encode_message(header, {}) if why != "NaN" else None
    # Execute / Assert
    with pytest.raises(MessageError) as sent:
        encode(Status("dev-1", True, info))
    assert "field 'info'" in str(sent.value) and "\n" not in str(sent.value), why
    if payload is not None:  # json cannot write NaN into a header; encode() refused it above
        with pytest.raises(MessageError, match="bad header: status field 'info'"):
            status_from_payload(payload, "dev-1", 1 << 20)


# ---- the card a device makes ---------------------------------------------------------------


def test_a_device_card_names_the_package_beside_its_bundle_and_fits_a_status(tmp_path: Path) -> None:
    # Prepare: one bundle alone, one laid out as a flashed release, one beside a broken manifest
    for name, text in (("flashed", '{"edgeftl_version": "1.2.3+gabcdefabcdef", "format": 1}'), ("broken", "{")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "edgeftl-package.json").write_text(text)
    # Execute
    alone = device_card(tmp_path / "alone" / "bundle", SHA)
    flashed = device_card(tmp_path / "flashed" / "bundle", SHA)
    broken = device_card(tmp_path / "broken" / "bundle", SHA)
    given = device_card(tmp_path / "flashed" / "bundle", SHA, package_id="fedcba9876543210")
    later = with_progress(flashed, 3, 2)
    # Assert
    installed = importlib.metadata.version("edgeftl")
    assert "package_id" not in alone and alone["edgeftl_version"] == installed
    assert (alone["platform_machine"], alone["bundle_sha256"], alone["rounds_done"]) == (os.uname().machine, SHA, 0)
    manifest_id = hashlib.sha256((tmp_path / "flashed" / "edgeftl-package.json").read_bytes()).hexdigest()[:16]
    assert (flashed["package_id"], flashed["edgeftl_version"]) == (manifest_id, "1.2.3+gabcdefabcdef")
    assert broken["edgeftl_version"] == installed and given["package_id"] == "fedcba9876543210"
    assert (later["last_round"], later["rounds_done"]) == (3, 2) and later["peak_rss_mib"] >= flashed["peak_rss_mib"]
    assert alone["mem_available_mib"] > 0 and later["mem_available_mib"] > 0  # Linux: /proc/meminfo MemAvailable
    assert decode(encode(Status("dev-1", True, later)), 1 << 20).info == later
    with pytest.raises(ValueError, match="bad package id 'a b'"):
        device_card(tmp_path, SHA, package_id="a b")


# ---- the card a device link announces ------------------------------------------------------


def _retained(broker: InProcessBroker, prefix: str, device: str) -> Status:
    return status_from_payload(broker._retained[Topics(prefix).status(device)], device, 1 << 20)


@pytest.mark.parametrize("signed", [False, True])
def test_a_device_link_announces_its_card_at_birth_clean_close_and_in_its_will(signed: bool) -> None:
    # Prepare
    broker = InProcessBroker()
    key = Ed25519PrivateKey.generate()
    keys = Keys(key, None) if signed else None

    def device(name: str) -> Link:
        return Link.device(InProcessConnection(broker, f"c-{name}"), "fl", name, keys=keys)

    stays, leaves, dies = device("stays"), device("leaves"), device("dies")
    for link in (stays, leaves, dies):
        link.announce({**CARD, "last_round": -1} if link is dies else CARD)
        link.connect()
    # Execute: one card changes while connected; one device leaves cleanly, one vanishes
    stays.announce({**CARD, "last_round": 5})
    leaves.close()
    dies.close(abrupt=True)
    # Assert: the retained statuses carry the cards; only the will says "will": 1
    assert _retained(broker, "fl", "stays") == Status("stays", True, {**CARD, "last_round": 5})
    assert _retained(broker, "fl", "leaves") == Status("leaves", False, CARD)
    assert _retained(broker, "fl", "dies") == Status("dies", False, {**CARD, "last_round": -1, "will": 1})
    if signed:  # a reader that trusts the device's key takes every one of them
        reader = Keys(None, dict.fromkeys(("stays", "leaves", "dies"), key.public_key()))
        for name in ("stays", "leaves", "dies"):
            reader.check(broker._retained[Topics("fl").status(name)], _retained(broker, "fl", name))


def test_a_device_link_without_a_card_keeps_the_text_form() -> None:
    # Prepare
    broker = InProcessBroker()
    link = Link.device(InProcessConnection(broker, "c-1"), "fl", "dev-1")
    # Execute
    link.connect()
    birth = broker._retained["fl/status/dev-1"]
    link.close(abrupt=True)
    # Assert
    assert (birth, broker._retained["fl/status/dev-1"]) == (b"online", b"offline")


# ---- rows and the table --------------------------------------------------------------------


def test_rows_are_sorted_and_lost_is_an_offline_will() -> None:
    # Prepare
    statuses = [Status("dev-b", False, {**CARD, "will": 1}), Status("dev-a", True, CARD),
                Status("dev-c", False, CARD), Status("old", True)]
    # Execute
    rows = rows_of(statuses)
    # Assert
    assert [(r.device_id, r.state) for r in rows] == [("dev-a", "online"), ("dev-b", "lost"), ("dev-c", "offline"),
                                                      ("old", "online")]
    assert count_line(rows) == "4 devices: 2 online, 2 offline (1 lost)"
    assert count_line(rows[:1]) == "1 device: 1 online, 0 offline"
    assert row_of(Status("x", True, {"last_round": "4", "peak_rss_mib": "big"})).last_round is None


def test_the_table_shows_each_column_and_dashes_for_what_a_card_lacks() -> None:
    # Prepare
    rows = rows_of([Status("dev-a", True, CARD), Status("old", False)])
    # Execute
    lines = table(rows).splitlines()
    # Assert: hand-written expected text, columns two spaces apart
    assert lines == [
        "DEVICE  STATE    PLATFORM         BUNDLE        EDGEFTL  ONNXRUNTIME  PACKAGE           ROUND  PEAK MiB",
        "dev-a   online   x86_64/py3.11.7  abababababab  0.3.0    1.32.0       0123456789abcdef  4      212",
        "old     offline  -                -             -        -            -                 -      -",
        "2 devices: 1 online, 1 offline",
    ]


def test_reading_statuses_collects_the_latest_of_each_device_and_publishes_nothing() -> None:
    # Prepare: retained statuses, one of them not a status at all
    broker = InProcessBroker()
    rogue = InProcessConnection(broker, "rogue")
    rogue.connect()
    rogue.send("fl/status/dev-1", encode(Status("dev-1", True, CARD)), 1, True)
    rogue.send("fl/status/dev-2", b"offline", 1, True)
    rogue.send("fl/status/dev-3", b"Online", 1, True)
    before = dict(broker._retained)
    # Execute
    statuses, refused = read_statuses(InProcessConnection(broker, "reader", clean_start=True), "fl", 0.3)
    # Assert
    assert sorted(statuses, key=lambda s: s.device_id) == [Status("dev-1", True, CARD), Status("dev-2", False)]
    assert [(r.device_id, r.kind) for r in refused] == [("dev-3", "truncated message")]
    assert broker._retained == before


# ---- real processes through real Mosquitto -------------------------------------------------


class Fleet:
    """A federation's processes on one prefix, with their logs; everything is killed at the end."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp, self.url, self.prefix = tmp, url, f"fleet-{uuid.uuid4().hex[:8]}"
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "edgeftl.device.cli", *argv], stdout=log,
                                   stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def device(self, name: str, folder: Path, *flags: str) -> subprocess.Popen:
        data = write_csv(self.tmp / f"{name}.csv", *keyword_dataset(16, seed=ord(name[-1])))
        return self.start(name, "device", "run", "--broker", self.url, "--bundle", str(folder), "--data", str(data),
                          "--id", name, "--prefix", self.prefix, "--threads", "1", *flags)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def status(self) -> dict:
        """`edgeftl fleet status --json`, as a user runs it."""
        done = subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "fleet", "status", "--broker", self.url,
                               "--prefix", self.prefix, "--wait-s", "1", "--json"],
                              capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)
        view["by_id"] = {row["device_id"]: row for row in view["devices"]}
        return view

    def status_until(self, ready, what: str) -> dict:
        end = time.monotonic() + WAIT_S
        while not ready(view := self.status()):
            assert time.monotonic() < end, f"fleet status never showed {what}: {view}"
            time.sleep(0.5)
        return view

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture
def fleet(mosquitto_broker, tmp_path) -> Iterator[Fleet]:
    host, port = mosquitto_broker
    made = Fleet(tmp_path, f"mqtt://{host}:{port}")
    yield made
    made.kill_all()


def _released(folder: Path, release: Path) -> tuple[Path, str]:
    """A copy of the bundle laid out as a flashed release, with a package manifest beside it; the
    package id a device computes from that manifest's bytes."""
    shutil.copytree(folder, release / "bundle")
    manifest = json.dumps({"format": 1, "edgeftl_version": "9.9.9+gfeedfacecafe"}, sort_keys=True, indent=1)
    (release / "edgeftl-package.json").write_text(manifest)
    return release / "bundle", hashlib.sha256(manifest.encode()).hexdigest()[:16]


def test_fleet_status_shows_real_devices_through_a_round_a_clean_exit_and_a_kill(fleet: Fleet, tmp_path_factory,
                                                                                  tmp_path) -> None:
    # Prepare: dev-a serves until killed (its release id given, as flash gives it); dev-b runs from a
    # "flashed" copy of the bundle and leaves cleanly after one update
    folder = bundle(tmp_path_factory, "bert-int8")
    sha = bundle_sha256(folder)
    copy, package_b = _released(folder, tmp_path / "release")
    dev_a = fleet.device("dev-a", folder, "--package-id", "00112233aabbccdd")
    dev_b = fleet.device("dev-b", copy, "--rounds", "1")
    before = fleet.status_until(lambda v: v["online"] == 2, "two devices online")
    # Execute 1: one round of a real coordinator
    coordinator = fleet.start("coordinator", "coordinator", "--broker", fleet.url, "--bundle", str(folder),
                              "--out", str(tmp_path / "run"), "--prefix", fleet.prefix, "--rounds", "1", "--steps", "2",
                              "--batch", "8", "--deadline-s", "600", "--wait-devices", "2", "--wait-devices-s", "120")
    assert coordinator.wait(timeout=WAIT_S) == 0, fleet.log("coordinator")[-3000:]
    assert dev_b.wait(timeout=WAIT_S) == 0, fleet.log("dev-b")[-3000:]
    after = fleet.status_until(lambda v: v["by_id"]["dev-a"]["last_round"] == 0, "dev-a past round 0")
    # Execute 2: dev-a vanishes without a clean close
    dev_a.send_signal(signal.SIGKILL)
    dev_a.wait(timeout=30)
    gone = fleet.status_until(lambda v: v["by_id"]["dev-a"]["state"] != "online", "dev-a gone")
    # Assert: before the round, both online with their cards
    a, b = before["by_id"]["dev-a"], before["by_id"]["dev-b"]
    for row in (a, b):
        assert (row["state"], row["platform_machine"], row["bundle_sha256"]) == ("online", os.uname().machine, sha)
        assert row["peak_rss_mib"] > 0 and row["rounds_done"] == 0 and row["last_round"] is None
        assert row["onnxruntime"] not in (None, "unknown") and row["edgeftl_version"] not in (None, "unknown")
    assert (a["package_id"], b["package_id"], b["edgeftl_version"]) == ("00112233aabbccdd", package_b,
                                                                        "9.9.9+gfeedfacecafe")
    # ... after it: dev-a online at round 0, dev-b offline (a clean exit, not lost) at round 0
    a, b = after["by_id"]["dev-a"], after["by_id"]["dev-b"]
    assert (a["state"], a["last_round"], a["rounds_done"]) == ("online", 0, 1)
    assert (b["state"], b["last_round"], b["rounds_done"]) == ("offline", 0, 1)
    assert a["peak_rss_mib"] >= before["by_id"]["dev-a"]["peak_rss_mib"] and b["peak_rss_mib"] > 0
    assert (after["count"], after["online"], after["offline"], after["lost"]) == (2, 1, 1, 0)
    # ... after the kill: dev-a lost, its will carrying the card as it stood at connect
    a = gone["by_id"]["dev-a"]
    assert (a["state"], a["bundle_sha256"], a["last_round"]) == ("lost", sha, None)
    assert gone["by_id"]["dev-b"]["state"] == "offline"


def test_fleet_status_prints_a_table_and_publishes_nothing(fleet: Fleet) -> None:
    # Prepare: a retained card, and a watcher on everything under the prefix (drained of retained messages)
    rogue = MqttConnection(fleet.url, f"rogue-{fleet.prefix}", clean_start=True)
    rogue.connect()
    rogue.send(f"{fleet.prefix}/status/dev-1", encode(Status("dev-1", True, CARD)), 1, True)
    assert rogue.flush()
    seen: list[str] = []
    watcher = MqttConnection(fleet.url, f"watch-{fleet.prefix}", clean_start=True)
    watcher.on_frame = lambda topic, frame: seen.append(topic)
    watcher.subscribe([f"{fleet.prefix}/#"])
    watcher.connect()
    time.sleep(0.5)
    seen.clear()
    # Execute
    done = subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "fleet", "status", "--broker", fleet.url,
                           "--prefix", fleet.prefix, "--wait-s", "0.5"], capture_output=True, text=True, timeout=WAIT_S)
    time.sleep(0.5)
    watcher.close()
    rogue.close()
    # Assert
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATE", "PLATFORM"]
    assert lines[1].split()[:4] == ["dev-1", "online", "x86_64/py3.11.7", "abababababab"]
    assert lines[-1] == "1 device: 1 online, 0 offline"
    assert seen == []


def test_fleet_status_refuses_bad_input_with_one_line() -> None:
    # Execute
    runs = [subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "fleet", "status", *argv],
                           capture_output=True, text=True, timeout=WAIT_S)
            for argv in (["--broker", "http://x"], ["--broker", "mqtt://127.0.0.1:1", "--wait-s", "0"])]
    device = subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "device", "run", "--broker", "mqtt://127.0.0.1:1",
                             "--bundle", "b", "--data", "d", "--id", "dev-1", "--package-id", "no/slash"],
                            capture_output=True, text=True, timeout=WAIT_S)
    # Assert
    assert [r.returncode for r in (*runs, device)] == [2, 2, 2]
    assert [len(r.stderr.strip().splitlines()) for r in (*runs, device)] == [1, 1, 1]
    assert "bad broker URL" in runs[0].stderr and "--wait-s must be > 0" in runs[1].stderr
    assert "bad package id 'no/slash'" in device.stderr
