"""A fleet of 1,000 light devices (tools/fleet_load.py, two processes) on the real Mosquitto fixture, and
the coordinator sampling 50 of them per round for 3 rounds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeftl.coordinator.simulation.fleet import raise_open_files
from edgeftl.device.cli import main

from fixtures_build import bundle, keyword_dataset

FLEET, SAMPLED, ROUNDS = 1000, 50, 3
TOOL = Path(__file__).resolve().parents[1] / "tools" / "fleet_load.py"
# At import, before the session's Mosquitto starts: the broker inherits this process's open-file limit and
# needs a descriptor per client (CI runners often default to a soft limit of 1,024).
raise_open_files(FLEET + 256)


@pytest.mark.slow
def test_thousand_light_devices_partial_participation(mosquitto_broker, tmp_path_factory, tmp_path):
    host, port = mosquitto_broker
    url, folder, prefix = f"mqtt://{host}:{port}", bundle(tmp_path_factory, "bert-int8"), "fleet1k"
    fleet = subprocess.Popen(
        [sys.executable, str(TOOL), "--broker", url, "--bundle", str(folder), "--devices", str(FLEET), "--procs", "2",
         "--prefix", prefix, "--name-prefix", "fl", "--delay-s", "0.02", "--spread", "10", "--quiet"],
        stdout=subprocess.PIPE, text=True)
    try:
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", str(ROUNDS), "--devices-per-round", str(SAMPLED),
                   "--wait-devices", str(FLEET), "--wait-devices-s", "180", "--deadline-s", "60",
                   "--codec", "topk:0.1+int8"])
    finally:
        fleet.send_signal(signal.SIGTERM)
        try:
            out, _ = fleet.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            fleet.kill()  # its helper notices its parent is gone and leaves too
            raise
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for record in records:
        assert record["devices_selected"] == SAMPLED and record["updates_received"] == SAMPLED
        assert record["aggregated"] and record["updates_rejected"] == 0 and not record["failures"]
        assert FLEET - 10 <= record["devices_online"] <= FLEET
        assert all(name.startswith("fl-") for name in record["devices"])
    assert len({frozenset(r["devices"]) for r in records}) == ROUNDS  # a fresh sample each round
    counts = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert fleet.returncode == 0 and len(counts) == 2  # both processes left cleanly and reported
    assert sum(c["devices"] for c in counts) == FLEET
    assert sum(c["updates_sent"] for c in counts) == SAMPLED * ROUNDS


def test_dropouts_and_failures_are_accounted_for(mosquitto_broker, tmp_path_factory, tmp_path):
    """Light devices that vanish (the broker sends their will) or send train_failed: every sampled device
    ends each round as an update, an error reply or an offline failure (their return is not waited for)."""
    host, port = mosquitto_broker
    url, folder, prefix = f"mqtt://{host}:{port}", bundle(tmp_path_factory, "bert-int8"), "fleetdrop"
    fleet = subprocess.Popen(
        [sys.executable, str(TOOL), "--broker", url, "--bundle", str(folder), "--devices", "30", "--prefix", prefix,
         "--name-prefix", "dr", "--dropout", "0.3", "--fail", "0.2", "--offline-s", "1", "--quiet"],
        stdout=subprocess.PIPE, text=True)
    try:
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", "3", "--devices-per-round", "10", "--wait-devices", "30",
                   "--wait-devices-s", "60", "--deadline-s", "30", "--codec", "int8"])
    finally:
        fleet.send_signal(signal.SIGTERM)
        try:
            out, _ = fleet.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            fleet.kill()
            raise
    assert rc == 0 and fleet.returncode == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    codes = [f["code"] for r in records for f in r["failures"].values()]
    for record in records:
        assert record["updates_received"] + len(record["failures"]) == record["devices_selected"] == 10
    assert {"offline", "train_failed"} <= set(codes)
    (counts,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert counts["errors_sent"] == codes.count("train_failed")
    assert counts["updates_sent"] == sum(r["updates_received"] for r in records)


@pytest.mark.slow
def test_a_real_device_joins_a_light_fleet(mosquitto_broker, tmp_path_factory, tmp_path):
    """`edgeftl device run` (training for real) and 20 light devices in one run, on the same topics."""
    host, port = mosquitto_broker
    url, folder, prefix = f"mqtt://{host}:{port}", bundle(tmp_path_factory, "bert-int8"), "fleetmix"
    texts, labels = keyword_dataset(24, seed=1)
    data = tmp_path / "real.csv"
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in zip(texts, labels, strict=True)))
    real = subprocess.Popen([sys.executable, "-m", "edgeftl.device.cli", "device", "run", "--broker", url, "--bundle",
                             str(folder), "--data", str(data), "--id", "real-0", "--prefix", prefix, "--rounds", "2",
                             "--threads", "1"])
    fleet = subprocess.Popen([sys.executable, str(TOOL), "--broker", url, "--bundle", str(folder), "--devices", "20",
                              "--prefix", prefix, "--name-prefix", "mx", "--quiet"], stdout=subprocess.PIPE, text=True)
    try:
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", "2", "--wait-devices", "21", "--wait-devices-s", "120",
                   "--deadline-s", "120", "--steps", "2", "--batch", "4", "--codec", "topk:0.1+int8"])
        assert real.wait(timeout=60) == 0
    finally:
        fleet.send_signal(signal.SIGTERM)
        fleet.communicate(timeout=60)
        if real.poll() is None:
            real.kill()
    assert rc == 0 and fleet.returncode == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["updates_received"] == record["devices_selected"] == 21
        assert record["devices"]["real-0"]["platform_machine"] != "light"  # trained: real loss, real machine
        assert record["devices"]["real-0"]["last_loss"] > 0 and record["devices"]["mx-3"]["platform_machine"] == "light"
