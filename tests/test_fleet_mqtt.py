"""A fleet of 1,000 light devices (tools/fleet_load.py, two processes) on the real Mosquitto fixture, and
the coordinator sampling 50 of them per round for 3 rounds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgeftl.coordinator.simulation.fleet import raise_open_files
from edgeftl.device.cli import main

from fixtures_build import bundle, keyword_dataset
from light_fleet import start_fleet, stop_fleet

FLEET, SAMPLED, ROUNDS = 1000, 50, 3
# At import, before the session's Mosquitto starts: the broker inherits this process's open-file limit and
# needs a descriptor per client (CI runners often default to a soft limit of 1,024).
raise_open_files(FLEET + 256)


@pytest.mark.slow
def test_thousand_light_devices_partial_participation(mosquitto_broker, tmp_path_factory, tmp_path):
    host, port = mosquitto_broker
    url, folder, prefix = f"mqtt://{host}:{port}", bundle(tmp_path_factory, "bert-int8"), "fleet1k"
    fleet = start_fleet(url, folder, prefix, "fl", FLEET, "--procs", "2", "--delay-s", "0.02", "--spread", "10")
    try:
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", str(ROUNDS), "--devices-per-round", str(SAMPLED),
                   "--wait-devices", str(FLEET), "--wait-devices-s", "180", "--deadline-s", "60",
                   "--codec", "topk:0.1+int8"])
    finally:
        counts = stop_fleet(fleet)
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for record in records:
        assert record["devices_selected"] == SAMPLED and record["updates_received"] == SAMPLED
        assert record["aggregated"] and record["updates_rejected"] == 0 and not record["failures"]
        assert FLEET - 10 <= record["devices_online"] <= FLEET
        assert all(name.startswith("fl-") for name in record["devices"])
    assert len({frozenset(r["devices"]) for r in records}) == ROUNDS  # a fresh sample each round
    assert fleet.returncode == 0 and len(counts) == 2  # both processes left cleanly and reported
    assert sum(c["devices"] for c in counts) == FLEET
    assert sum(c["updates_sent"] for c in counts) == SAMPLED * ROUNDS


def test_dropouts_and_failures_are_accounted_for(mosquitto_broker, tmp_path_factory, tmp_path):
    """Light devices that vanish (the broker sends their will) or send train_failed: every sampled device
    ends each round as an update, an error reply or an offline failure (their return is not waited for)."""
    host, port = mosquitto_broker
    url, folder, prefix = f"mqtt://{host}:{port}", bundle(tmp_path_factory, "bert-int8"), "fleetdrop"
    fleet = start_fleet(url, folder, prefix, "dr", 30, "--dropout", "0.3", "--fail", "0.2", "--offline-s", "1")
    try:
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", "3", "--devices-per-round", "10", "--wait-devices", "30",
                   "--wait-devices-s", "60", "--deadline-s", "30", "--codec", "int8"])
    finally:
        reports = stop_fleet(fleet)
    assert rc == 0 and fleet.returncode == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    codes = [f["code"] for r in records for f in r["failures"].values()]
    for record in records:
        assert record["updates_received"] + len(record["failures"]) == record["devices_selected"] == 10
    assert {"offline", "train_failed"} <= set(codes)
    (counts,) = reports
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
    fleet = start_fleet(url, folder, prefix, "mx", 20)
    try:
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", "2", "--wait-devices", "21", "--wait-devices-s", "120",
                   "--deadline-s", "120", "--steps", "2", "--batch", "4", "--codec", "topk:0.1+int8"])
        assert real.wait(timeout=60) == 0
    finally:
        stop_fleet(fleet)
        if real.poll() is None:
            real.kill()
    assert rc == 0 and fleet.returncode == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["updates_received"] == record["devices_selected"] == 21
        assert record["devices"]["real-0"]["platform_machine"] != "light"  # trained: real loss, real machine
        assert record["devices"]["real-0"]["last_loss"] > 0 and record["devices"]["mx-3"]["platform_machine"] == "light"
