"""A fleet of light devices as real MQTT connections, all driven by one `selectors` loop per process.

Each light device (light.py) has its own paho-mqtt 2 client and TCP connection to the broker, but
no thread: paho's external-event-loop hooks (on_socket_open / close / register_write /
unregister_write) put the sockets in one selector, and the loop calls loop_read, loop_write and
(every second, for keepalive) loop_misc. Connections are opened at `connect_rate` per second so
the broker's listen backlog is not flooded. `--procs P` starts P - 1 more processes of this module,
each with its slice of the device ids. Each process raises its open-file limit (soft to hard) and
says so: a client is one file descriptor here and one in the broker (which inherits the limit of
whoever starts it). Mosquitto queues at most max_queued_messages (default 1,000) + max_inflight_messages
(20) QoS 1 messages per client: a coordinator that subscribed to statuses at QoS 1 after N devices were
online got only that many of their retained statuses (measured: 1,020 of 12,000 online); it now reads
them at QoS 0 (Link.subscribe_state), and sees them all (tests/test_fleet_late.py).
Given a broker cluster's nodes (`--broker mqtt://a:1,mqtt://b:2,...`), each device starts at one chosen by
a hash of its id and moves to the next when its connection is lost (docs/BROKERS.md).

    python tools/fleet_load.py --broker mqtt://127.0.0.1:1883 --bundle b/ --devices 1000 --procs 2
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt

from edgeftl.coordinator.simulation.light import Behaviour, LightDevice, Shared
from edgeftl.device.link.brokers import BrokerRing, parse_brokers
from edgeftl.device.measure import peak_rss_mib
from edgeftl.device.protocol.messages import Update
from edgeftl.device.protocol.topics import device_client_id

log = logging.getLogger("edgeftl.fleet")
KEEPALIVE_S = 60
REPORT_EVERY_S = 5.0
RECONNECT_S = 1.0  # after a lost connection: this, plus up to as much again at random (no thundering herd)


@dataclass
class FleetConfig:
    """One process's part of a fleet: devices `first` .. `first + devices - 1`, named `name_prefix`-N."""

    url: str
    devices: int
    first: int = 0
    name_prefix: str = "light"
    prefix: str = "edgeftl"
    connect_rate: float = 500.0  # new connections per second
    duration_s: float = 0.0  # 0: until SIGTERM / SIGINT
    churn_per_min: float = 0.0  # drops per connected device per minute (each offline for behaviour.offline_s)
    behaviour: Behaviour = field(default_factory=Behaviour)
    ack_log: Path | None = None  # one JSON line per update the broker acknowledged (PUBACK)

    def __post_init__(self) -> None:
        if self.devices < 1 or self.first < 0 or not self.connect_rate > 0 or self.duration_s < 0:
            raise ValueError(f"need devices >= 1, first >= 0, connect_rate > 0, duration_s >= 0; got {self.devices}, "
                             f"{self.first}, {self.connect_rate}, {self.duration_s}")
        if not 0 <= self.churn_per_min <= 60:
            raise ValueError(f"churn_per_min is drops per device per minute in 0..60 (0.1: one every 10 minutes; "
                             f"at most one a second), got {self.churn_per_min}")
        brokers = parse_brokers(self.url)  # raises naming the accepted forms
        if brokers[0].tls or brokers[0].version != "3.1.1":
            raise ValueError(f"the fleet speaks plain MQTT 3.1.1: give mqtt://host[:port] URLs, got {self.url!r}")


def raise_open_files(needed: int) -> int:
    """Raise the soft open-file limit to the hard one when `needed` exceeds it; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > soft and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("raised RLIMIT_NOFILE from %d to %d for %d connections", soft, hard, needed)
        soft = hard
    if needed > soft:
        raise RuntimeError(f"{needed} connections need {needed} file descriptors; RLIMIT_NOFILE is {soft} "
                           "(raise the hard limit: ulimit -Hn, or split with --procs on another host)")
    return soft


class _Client:
    """A paho client carrying one light device: the device's `Port`."""

    def __init__(self, fleet: Fleet, device_id: str, shared: Shared, behaviour: Behaviour) -> None:
        self.fleet, self.connected, self.back_at = fleet, False, 0.0
        client_id = device_client_id(device_id)
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self.ring = BrokerRing(fleet.brokers, client_id)  # the cluster node this device uses, and the next ones
        self.device = LightDevice(device_id, shared, behaviour, self)
        self.update_topic = shared.topics.update(device_id)
        self.unacked: dict[int, tuple[str, int, int]] = {}  # update frame's mid -> (run_id, round, seq)
        self.subscribing: dict[int, list[str]] = {}  # SUBSCRIBE's mid -> its filters, until the SUBACK
        self.retry: list[str] = []  # filters the broker refused: subscribed again a second later
        self.paho.on_connect = lambda c, u, f, rc, p: self._on_connect(rc)
        self.paho.on_disconnect = lambda c, u, f, rc, p: self._on_disconnect()
        self.paho.on_message = lambda c, u, m: self._on_message(m)
        self.paho.on_publish = lambda c, u, mid, rc, p: self._on_publish(mid)
        self.paho.on_subscribe = lambda c, u, mid, reasons, p: self._on_subscribe(mid, reasons)
        self.paho.on_socket_open = lambda c, u, s: fleet.watch(s, self, write=False)
        self.paho.on_socket_close = lambda c, u, s: fleet.forget(s)
        self.paho.on_socket_register_write = lambda c, u, s: fleet.watch(s, self, write=True)
        self.paho.on_socket_unregister_write = lambda c, u, s: fleet.watch(s, self, write=False)

    def start(self) -> None:
        topic, will = self.device.will()
        self.paho.will_set(topic, will, qos=1, retain=True)
        broker = self.ring.current
        self.subscribing.clear()
        self.retry.clear()  # on_connect subscribes everything again
        try:
            self.paho.connect(broker.host, broker.port, KEEPALIVE_S)
        except OSError as exc:
            nxt = self.ring.advance()
            log.warning("%s: connect to %s failed (%s); trying %s in 5 s", self.device.device_id, broker.url, exc,
                        nxt.url)
            self.drop(5.0)

    def _on_connect(self, rc: mqtt.ReasonCode) -> None:
        if rc.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device.device_id, rc)
            return
        self.connected = True
        self.device.on_connect()

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        self.device.on_frame(message.topic, cast(bytes, message.payload), time.monotonic())  # bytes in paho 2
        if self.device.next_due() is not None:
            self.fleet.busy.add(self)

    def _on_disconnect(self) -> None:
        """A lost connection (not one drop() planned, nor the fleet leaving): back soon, on the next node
        when there are several. paho keeps the unacknowledged QoS 1 frames and sends them again there."""
        self.connected = False
        now = time.monotonic()
        if now >= self.back_at and not self.fleet.stopping:
            self.ring.advance()
            self.back_at = now + RECONNECT_S * (1 + self.fleet.rng.random())
            self.fleet.later(self.back_at, self)

    def _on_subscribe(self, mid: int, reasons: list[mqtt.ReasonCode]) -> None:
        """A node of a cluster refuses subscriptions while it elects stream leaders (NATS: 0x80 when it
        cannot create the consumer): those filters are tried again a second later, on the same connection."""
        filters = self.subscribing.pop(mid, [])
        refused = [f for f, reason in zip(filters, reasons, strict=False) if reason.is_failure]
        if refused:
            self.retry += [f for f in refused if f not in self.retry]
            self.fleet.later(time.monotonic() + RECONNECT_S, self)

    def _on_publish(self, mid: int) -> None:
        key = self.unacked.pop(mid, None)
        if key is not None and key not in self.unacked.values():  # every frame of that update acknowledged
            self.fleet.acked(self.device.device_id, *key)

    # ---- Port -------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        reply = self.device.reply  # what the device is sending when it publishes on its update topic
        if self.fleet.ack_file is not None and isinstance(reply, Update) and topic.startswith(self.update_topic):
            self.unacked[info.mid] = (reply.run_id, reply.round, reply.seq)

    def subscribe(self, filters: list[str]) -> None:
        rc, mid = self.paho.subscribe([(f, 1) for f in filters])
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self.subscribing[mid] = filters

    def unsubscribe(self, filters: list[str]) -> None:
        self.retry = [f for f in self.retry if f not in filters]
        self.paho.unsubscribe(filters)

    def drop(self, offline_s: float) -> None:
        sock = self.paho.socket()
        if sock is not None:  # a TCP close without DISCONNECT, as a crash looks to the broker: the will goes out;
            cast(socket.socket, sock).shutdown(socket.SHUT_RDWR)  # paho reads the EOF next and closes its side
        self.connected, self.back_at = False, time.monotonic() + offline_s
        self.fleet.later(self.back_at, self)


class Fleet:
    """The light devices of one process and the loop that drives their sockets and clocks."""

    def __init__(self, config: FleetConfig, shared: Shared) -> None:
        self.config, self.shared = config, shared
        self.brokers = parse_brokers(config.url)
        raise_open_files(config.devices + 64)
        self.selector = selectors.DefaultSelector()
        names = [f"{config.name_prefix}-{i}" for i in range(config.first, config.first + config.devices)]
        self.clients = [_Client(self, name, shared, config.behaviour) for name in names]
        self._timers: list[tuple[float, int, _Client]] = []
        self.busy: set[_Client] = set()  # devices with a task pending: only they are ticked
        self._stop = self.stopping = False
        self.rng = random.Random(config.first)
        self.ack_file = None if config.ack_log is None else Path(config.ack_log).open("a", buffering=1)

    def acked(self, device_id: str, run_id: str, round_index: int, seq: int) -> None:
        """Log an update the broker acknowledged: from then on the broker owes it to the coordinator."""
        if self.ack_file is not None:
            self.ack_file.write(json.dumps({"device": device_id, "run_id": run_id, "round": round_index, "seq": seq,
                                            "time": time.time()}) + "\n")

    def watch(self, sock: Any, client: _Client, write: bool) -> None:
        """Select `sock` for reading, and for writing while paho has bytes queued."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self.selector.modify(sock, events, client)
        except KeyError:
            self.selector.register(sock, events, client)

    def forget(self, sock: Any) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def later(self, when: float, client: _Client) -> None:
        heapq.heappush(self._timers, (when, id(client), client))

    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self) -> dict[str, int]:
        """Connect every device (paced), serve until the duration ends or stop(); leave gracefully."""
        began = time.monotonic()
        end = began + self.config.duration_s if self.config.duration_s else float("inf")
        pending, next_misc, next_report = list(reversed(self.clients)), began, began + REPORT_EVERY_S
        parent = os.getppid()
        while not self._stop and time.monotonic() < end:
            now = time.monotonic()
            allowed = int((now - began) * self.config.connect_rate) + 1 - (len(self.clients) - len(pending))
            for _ in range(min(max(allowed, 0), len(pending))):
                pending.pop().start()
            for key, mask in self.selector.select(timeout=0.05):
                client: _Client = key.data
                if mask & selectors.EVENT_READ:
                    client.paho.loop_read()
                if mask & selectors.EVENT_WRITE and client.paho.socket() is not None:
                    client.paho.loop_write()
            self._clocks(now)
            if now >= next_misc:
                next_misc = now + 1.0
                self._stop = self._stop or os.getppid() != parent  # whoever started us is gone: so are we
                self._churn()
                for client in self.clients:
                    if client.connected:
                        client.paho.loop_misc()
            if now >= next_report:
                next_report = now + REPORT_EVERY_S
                log.info("fleet %s", self.counts())
        self._leave()
        return self.counts()

    def _churn(self) -> None:
        """Once a second: each connected device goes offline (will sent) with chance churn_per_min / 60."""
        chance = self.config.churn_per_min / 60
        if chance:
            for client in self.clients:
                if client.connected and self.rng.random() < chance:
                    client.drop(self.config.behaviour.offline_s)

    def _clocks(self, now: float) -> None:
        """Tick the devices with a task pending (the sampled ones, not the fleet) and bring back those
        whose offline period ended."""
        for client in list(self.busy):
            client.device.tick(now)
            if client.device.next_due() is None:
                self.busy.discard(client)
        while self._timers and self._timers[0][0] <= now:
            _, _, client = heapq.heappop(self._timers)
            if not client.connected and client.back_at <= now:
                client.start()
            elif client.connected and client.retry:
                filters, client.retry = client.retry, []
                client.subscribe(filters)

    def counts(self) -> dict[str, int]:
        devices = [c.device for c in self.clients]
        return {"devices": len(devices), "connected": sum(c.connected for c in self.clients),
                "updates_sent": sum(d.updates_sent for d in devices),
                "errors_sent": sum(d.errors_sent for d in devices),
                "peak_rss_mib": int(peak_rss_mib() or 0)}

    def _leave(self, timeout_s: float = 10.0) -> None:
        """Offline statuses (retained) and DISCONNECTs, served until written or `timeout_s` passes."""
        self.stopping = True
        for client in self.clients:
            if client.connected:
                client.publish(self.shared.topics.status(client.device.device_id), client.device.goodbye(), True)
                client.paho.disconnect()
        end = time.monotonic() + timeout_s
        while self.selector.get_map() and time.monotonic() < end:
            for key, mask in self.selector.select(timeout=0.05):
                if mask & selectors.EVENT_WRITE and key.data.paho.socket() is not None:
                    key.data.paho.loop_write()
                if mask & selectors.EVENT_READ and key.data.paho.socket() is not None:
                    key.data.paho.loop_read()
        if self.ack_file is not None:
            self.ack_file.close()


def run_fleet(config: FleetConfig, shared: Shared) -> dict[str, int]:
    fleet = Fleet(config, shared)
    signal.signal(signal.SIGTERM, fleet.stop)
    signal.signal(signal.SIGINT, fleet.stop)
    return fleet.run()


def spawn_helpers(argv: list[str], devices: int, procs: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Start procs - 1 more processes of this module with their slices; returns them and this process's count."""
    share = -(-devices // procs)
    helpers = []
    for index in range(1, procs):
        first, count = index * share, min(share, devices - index * share)
        if count > 0:
            args = [*argv, "--procs", "1", "--first", str(first), "--devices", str(count)]
            helpers.append(subprocess.Popen([sys.executable, "-m", "edgeftl.coordinator.simulation.fleet_cli", *args]))
    return helpers, min(share, devices)
