"""A coordinator started after 2,000 light devices are online learns of every one of them from their
retained statuses (on the real Mosquitto fixture, whose per-client queue is the default 1,000
messages), and samples from all of them."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edgeftl.coordinator.simulation.fleet import raise_open_files
from edgeftl.device.cli import main

from fixtures_build import bundle
from light_fleet import start_fleet, stop_fleet

FLEET, SAMPLED = 2000, 100
raise_open_files(FLEET + 256)  # before the session's Mosquitto starts: it inherits the limit


def _watch(host: str, port: int, prefix: str) -> tuple[mqtt.Client, set[str]]:
    """A subscriber present before the fleet: it sees each birth live (not retained), to know when
    all devices are online without relying on what is under test."""
    seen: set[str] = set()
    lock = threading.Lock()

    def on_message(client, userdata, message) -> None:
        with lock:
            seen.add(message.topic)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{prefix}")
    client.on_message = on_message
    client.connect(host, port)
    client.subscribe(f"{prefix}/status/+", 1)
    client.loop_start()
    return client, seen


@pytest.mark.slow
def test_a_late_coordinator_sees_every_retained_status(mosquitto_broker, tmp_path_factory, tmp_path):
    # Prepare: 2,000 light devices online before the coordinator exists
    host, port = mosquitto_broker
    url, folder, prefix = f"mqtt://{host}:{port}", bundle(tmp_path_factory, "bert-int8"), "late2k"
    watcher, seen = _watch(host, port, prefix)
    fleet = start_fleet(url, folder, prefix, "lt", FLEET, "--procs", "2")
    try:
        end = time.monotonic() + 180
        while len(seen) < FLEET and time.monotonic() < end and fleet.poll() is None:
            time.sleep(0.2)
        assert len(seen) == FLEET, f"only {len(seen)} of {FLEET} light devices came online"
        # Execute: a coordinator that connects now, waits for all of them and runs one round
        rc = main(["coordinator", "--broker", url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                   "--prefix", prefix, "--rounds", "2", "--devices-per-round", str(SAMPLED), "--sample", "fair",
                   "--wait-devices", str(FLEET), "--wait-devices-s", "60", "--deadline-s", "60",
                   "--codec", "topk:0.1+int8"])
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        stop_fleet(fleet)
    # Assert: every device counted online; two fair rounds sample 200 different devices
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["devices_online"] for r in records] == [FLEET, FLEET]
    assert all(r["updates_received"] == SAMPLED and r["sample_mode"] == "fair" for r in records)
    assert len(set(records[0]["devices"]) | set(records[1]["devices"])) == 2 * SAMPLED
