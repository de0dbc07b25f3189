"""Broker clusters: --broker lists, failover between nodes, and a 3-node NATS cluster losing a node mid-round.

The kill test runs the coordinator (`edgeftl coordinator`), 30 light devices (tools/fleet_load.py) and one
real device (training) over 3 NATS nodes, every client given the whole list, and SIGKILLs the node the
coordinator is on during round 1: the coordinator and that node's devices must reconnect to the other nodes,
find their sessions there (JetStream, replicated to all 3), and every update the broker acknowledged while its
round was open must reach the coordinator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeftl.device.link import MqttConnection
from edgeftl.device.link.brokers import BrokerRing, parse_brokers
from edgeftl.device.protocol.topics import coordinator_client_id, device_client_id

from fixtures_build import bundle, keyword_dataset
from light_fleet import start_fleet, stop_fleet

DEVICES, ROUNDS, KILLED_ROUND = 30, 4, 1
KILL_AFTER_S = 1.5  # into the round: the task is out, the devices reply after 1-4 s
CLOSE_MARGIN_S = 0.5


@pytest.mark.parametrize("text, problem", [
    ("mqtt://a:1,,mqtt://b:2", "an empty entry"),
    ("mqtt://a:1,mqtt://a:1", "a:1 given more than once"),
    ("mqtt://a:1,mqtts://b:2", "the same scheme"),
    ("mqtt://a:1,mqtt5://b:2", "the same scheme"),
    ("mqtt://u@a:1,mqtt://b:2", "the same username"),
    ("mqtt://a:1,http://b:2", "bad broker URL 'http://b:2'"),
    ("mqtt://a:1,mqtt://b:x", "bad port in broker URL 'mqtt://b:x'"),
    (",".join(f"mqtt://h{i}:1" for i in range(17)), "at most 16"),
])
def test_bad_broker_lists_fail_with_one_line(text, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        parse_brokers(text)
    assert "\n" not in str(caught.value)


def test_a_list_spreads_clients_and_rotates():
    brokers = parse_brokers(" mqtt://127.0.0.1:1 , mqtt://127.0.0.1:2,mqtt://127.0.0.1:3")
    assert [b.port for b in brokers] == [1, 2, 3] and brokers[0].url == "mqtt://127.0.0.1:1"
    starts = [BrokerRing(brokers, f"edgeftl-light-{i}").current.port for i in range(300)]
    assert all(80 <= starts.count(port) <= 120 for port in (1, 2, 3))  # CRC-32 spreads 300 ids about evenly
    ring = BrokerRing(brokers, "edgeftl-light-0")
    first = ring.current.port
    assert [ring.advance().port for _ in range(3)] == [first % 3 + 1, (first + 1) % 3 + 1, first]
    assert parse_brokers("mqtt://127.0.0.1:1883")[0].port == 1883  # one URL: as before


def test_a_connection_moves_on_from_a_dead_node(mosquitto_broker):
    """The node a client starts at is down: the next attempt (paho's backoff, 1 s) goes to the live one."""
    host, port = mosquitto_broker
    dead = f"mqtt://{host}:1"  # nothing listens on port 1
    brokers = f"{dead},mqtt://{host}:{port}"
    client_id = next(f"fo-{i}" for i in range(100) if BrokerRing(parse_brokers(brokers), f"fo-{i}").current.url == dead)
    connection = MqttConnection(brokers, client_id, clean_start=True)
    try:
        connection.connect(10.0)
        assert connection.connected and connection.port == port and connection.url == f"mqtt://{host}:{port}"
    finally:
        connection.close()


def test_a_stale_will_is_answered_with_the_birth(mosquitto_broker):
    """Another client (standing in for a broker that publishes a replaced connection's will late) puts the
    device's will on its topic while it is connected: the device publishes its birth again, which stays retained;
    its farewell at a clean close stays too."""
    host, port = mosquitto_broker
    url, topic = f"mqtt://{host}:{port}", "stale/status/dev-1"
    device = MqttConnection(url, "stale-dev-1", clean_start=True)
    device.presence(topic, b"online", b"offline")
    other = MqttConnection(url, "stale-other", clean_start=True)
    device.connect(10.0)
    other.connect(10.0)
    try:
        other.send(topic, b"offline", 1, True)  # the device's will, as a broker would publish it
        assert other.flush(10.0)
        end, last = time.monotonic() + 10, _retained(url, topic)
        while last != b"online" and time.monotonic() < end:
            last = _retained(url, topic)
        assert last == b"online"  # without the device's answer it stays b"offline"
        device.close()  # a clean leave: its own farewell coming back is not answered
        assert _retained(url, topic) == b"offline"
    finally:
        other.close()
        device.close()


@pytest.mark.slow
def test_killing_a_cluster_node_mid_round_loses_no_acknowledged_update(nats_cluster, tmp_path_factory, tmp_path):
    """The node killed is the coordinator's (and about a third of the devices'): the hardest case, since the
    updates acknowledged by the other nodes while the coordinator reconnects wait in its session's stream
    consumer, which must move with it. Light devices log each update whose PUBACK they got (--ack-log); one
    real device (`edgeftl device run`, training), starting on that node too, moves with its persistent session."""
    folder, prefix, out, acks = bundle(tmp_path_factory, "bert-int8"), "cluster", tmp_path / "run", tmp_path / "acks"
    brokers = nats_cluster.broker_list
    ring = BrokerRing(parse_brokers(brokers), coordinator_client_id(prefix))
    killed = nats_cluster.urls.index(ring.current.url)
    real = next(name for name in (f"real-{i}" for i in range(100))
                if BrokerRing(parse_brokers(brokers), device_client_id(name)).current.url == ring.current.url)
    texts, labels = keyword_dataset(24, seed=1)
    data = tmp_path / "real.csv"
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in zip(texts, labels, strict=True)))
    with (tmp_path / "device.log").open("w") as log:
        device = subprocess.Popen(
            [sys.executable, "-m", "edgeftl.device.cli", "device", "run", "--broker", brokers, "--bundle", str(folder),
             "--data", str(data), "--id", real, "--prefix", prefix, "--rounds", str(ROUNDS), "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=log)
    fleet = start_fleet(brokers, folder, prefix, "cl", DEVICES, "--delay-s", "1", "--spread", "4",
                        "--ack-log", str(acks))
    with (tmp_path / "coordinator.log").open("w") as log:
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "edgeftl.device.cli", "coordinator", "--broker", brokers, "--bundle", str(folder),
             "--out", str(out), "--prefix", prefix, "--rounds", str(ROUNDS), "--wait-devices", str(DEVICES + 1),
             "--wait-devices-s", "120", "--deadline-s", "120", "--codec", "int8", "--steps", "2", "--batch", "4"],
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        closed, killed_at = _watch(out / "metrics.jsonl", coordinator, lambda: nats_cluster.kill(killed))
    finally:
        for process in (coordinator, device):
            if process.poll() is None:
                process.kill()
        reports = stop_fleet(fleet)
    assert coordinator.returncode == 0, (tmp_path / "coordinator.log").read_text()[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS)) and len(closed) == ROUNDS
    for record in records:  # every sampled device answered (an update or an error reply); the run went on
        assert record["aggregated"] and record["updates_received"] + record["updates_failed"] == \
            record["devices_selected"], record
    # It trained across the failover: its persistent session moved to another node.
    assert real in records[KILLED_ROUND]["devices"] and records[KILLED_ROUND]["devices"][real]["last_loss"] > 0
    received = {(name, r["round"]) for r in records for name in r["devices"]}
    # An update acknowledged while its round was open must be in that round's record. A round's close is
    # taken as when its record appeared (polled every 0.1 s), less a margin for writing it.
    log_lines = [json.loads(line) for line in acks.read_text().splitlines()]
    owed = {(a["device"], a["round"]) for a in log_lines if a["time"] < closed[a["round"]] - CLOSE_MARGIN_S}
    assert owed - received == set(), f"acknowledged while the round was open, never aggregated: {owed - received}"
    across = {(a["device"], a["round"]) for a in log_lines if a["round"] == KILLED_ROUND and a["time"] > killed_at}
    assert across & owed, "no update crossed the failover (acknowledged after the kill, in the open round)"
    (counts,) = reports
    assert fleet.returncode == 0 and counts["devices"] == DEVICES


def _retained(url: str, topic: str) -> bytes | None:
    """The retained payload on `topic`, as a fresh subscriber reads it."""
    seen: list[bytes] = []
    watcher = MqttConnection(url, f"stale-watch-{time.monotonic_ns()}", clean_start=True)
    watcher.on_frame = lambda _, payload: seen.append(payload)
    watcher.subscribe([topic])
    watcher.connect(10.0)
    time.sleep(0.2)
    watcher.close()
    return seen[-1] if seen else None


def _watch(metrics: Path, process: subprocess.Popen[bytes], kill: object) -> tuple[list[float], float]:
    """Poll the run's records until the coordinator exits: when each one appeared (wall clock, as the ack
    log's times), and when `kill` ran (KILL_AFTER_S into round KILLED_ROUND, its devices "training")."""
    closed: list[float] = []
    killed_at, end = 0.0, time.monotonic() + 600
    while process.poll() is None and time.monotonic() < end:
        lines = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        closed += [time.time()] * (lines - len(closed))
        if not killed_at and len(closed) == KILLED_ROUND and time.time() > closed[-1] + KILL_AFTER_S:
            kill()  # type: ignore[operator]
            killed_at = time.time()
        time.sleep(0.1)
    lines = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    closed += [time.time()] * (lines - len(closed))
    assert killed_at, "the run ended before the node could be killed"
    return closed, killed_at
