"""The gateway pattern: site Mosquittos bridged to a central Mosquitto (`edgeftl broker-config --bridge-to`).

Two sites, each a Mosquitto with the configuration broker-config writes and 5 light devices connected to it;
the coordinator on the central broker sees all 10 through the bridges (their retained statuses), and a run
of 2 rounds completes with every device's update each round.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgeftl.coordinator.bridge_config import bridge_text
from edgeftl.coordinator.simulation.broker import MosquittoBroker, free_port
from edgeftl.device.cli import main

from conftest import mosquitto_binary
from fixtures_build import bundle
from light_fleet import start_fleet, stop_fleet

PER_SITE, ROUNDS = 5, 2


def test_the_bridge_carries_each_place_one_way(tmp_path):
    text = bridge_text("central:8883", "depot-1", 1883, "127.0.0.1", "fed/a", True, None, "bridge", "s3cret")
    lines = text.splitlines()
    topics = sorted(line for line in lines if line.startswith("topic "))
    assert topics == ["topic fed/a/global/# in 1", "topic fed/a/secagg/down/# in 1", "topic fed/a/secagg/up/# out 1",
                      "topic fed/a/status/# out 1", "topic fed/a/task/# in 1", "topic fed/a/update/# out 1"]
    assert {"cleansession false", "remote_clientid edgeftl-bridge-depot-1", "addresses central:8883",
            "remote_username bridge", "remote_password s3cret", "listener 1883 127.0.0.1"} <= set(lines)
    out = tmp_path / "gw.conf"
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    assert main(["broker-config", "--bridge-to", "mqtts://c1:8883,mqtts://c2:8883", "--site", "depot-1", "--out",
                 str(out), "--username", "bridge", "--password-file", str(password)]) == 0
    assert "addresses c1:8883, c2:8883" in out.read_text() and out.stat().st_mode & 0o077 == 0  # password inside


@pytest.mark.parametrize("argv, problem", [
    (["--bridge-to", "mqtt://c:1883"], "--site"),
    (["--bridge-to", "mqtt://c:1883", "--site", "a b"], "bad site name"),
    (["--bridge-to", "http://c", "--site", "a"], "bad broker URL"),
    (["--bridge-to", "mqtt://c:1883", "--site", "a", "--ca-file", "x.pem"], "needs a TLS central broker URL"),
    ([], "--certs DIR"),
])
def test_bad_gateway_flags_fail_with_one_line(tmp_path, capsys, argv, problem):
    assert main(["broker-config", *argv, "--out", str(tmp_path / "gw.conf")]) != 0
    err = capsys.readouterr().err.strip()
    assert problem in err and "\n" not in err and not (tmp_path / "gw.conf").exists()


@contextmanager
def site_gateway(central: str, site: str, folder: Path, prefix: str) -> Iterator[str]:
    """A site's Mosquitto started from the configuration `edgeftl broker-config --bridge-to` writes."""
    port, conf = free_port(), folder / f"{site}.conf"
    assert main(["broker-config", "--bridge-to", central, "--site", site, "--port", str(port), "--out", str(conf),
                 "--prefix", prefix]) == 0
    with (folder / f"{site}.log").open("wb") as log:
        proc = subprocess.Popen([str(mosquitto_binary()), "-c", str(conf), "-v"], stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 10
        while b"Connecting bridge" not in (folder / f"{site}.log").read_bytes() and time.monotonic() < end:
            assert proc.poll() is None, (folder / f"{site}.log").read_text()
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_devices_at_two_sites_train_through_bridged_gateways(tmp_path_factory, tmp_path):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed: run `make mosquitto`")
    folder, prefix = bundle(tmp_path_factory, "bert-int8"), "gw"
    with MosquittoBroker() as central, site_gateway(central.url, "north", tmp_path, prefix) as north, \
            site_gateway(central.url, "south", tmp_path, prefix) as south:
        fleets = [start_fleet(url, folder, prefix, name, PER_SITE, "--delay-s", "0.2")
                  for url, name in ((north, "north"), (south, "south"))]
        try:
            rc = main(["coordinator", "--broker", central.url, "--bundle", str(folder), "--out", str(tmp_path / "run"),
                       "--prefix", prefix, "--rounds", str(ROUNDS), "--wait-devices", str(2 * PER_SITE),
                       "--wait-devices-s", "60", "--deadline-s", "60", "--codec", "int8"])
        finally:
            counts = [report for fleet in fleets for report in stop_fleet(fleet)]
    assert rc == 0 and all(fleet.returncode == 0 for fleet in fleets)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for record in records:
        assert record["updates_received"] == record["devices_selected"] == 2 * PER_SITE and record["aggregated"]
        assert {name.split("-")[0] for name in record["devices"]} == {"north", "south"}
    assert sum(c["updates_sent"] for c in counts) == ROUNDS * 2 * PER_SITE
