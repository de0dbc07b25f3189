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

    python tools/fleet_load.py --broker mqtt://127.0.0.1:1883 --bundle b/ --devices 1000 --procs 2
"""

from __future__ import annotations

import heapq
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
from typing import Any, cast

import paho.mqtt.client as mqtt

from edgeftl.coordinator.simulation.light import Behaviour, LightDevice, Shared
from edgeftl.device.link.mqtt import parse_url
from edgeftl.device.measure import peak_rss_mib
from edgeftl.device.protocol.topics import device_client_id

log = logging.getLogger("edgeftl.fleet")
KEEPALIVE_S = 60
REPORT_EVERY_S = 5.0


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

    def __post_init__(self) -> None:
        if self.devices < 1 or self.first < 0 or not self.connect_rate > 0 or self.duration_s < 0:
            raise ValueError(f"need devices >= 1, first >= 0, connect_rate > 0, duration_s >= 0; got {self.devices}, "
                             f"{self.first}, {self.connect_rate}, {self.duration_s}")
        if not 0 <= self.churn_per_min <= 60:
            raise ValueError(f"churn_per_min is drops per device per minute in 0..60 (0.1: one every 10 minutes; "
                             f"at most one a second), got {self.churn_per_min}")
        _, _, tls, version, _ = parse_url(self.url)  # raises naming the accepted forms
        if tls or version != "3.1.1":
            raise ValueError(f"the fleet speaks plain MQTT 3.1.1: give an mqtt://host[:port] URL, got {self.url!r}")


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
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_client_id(device_id),
                                clean_session=True)
        self.device = LightDevice(device_id, shared, behaviour, self)
        self.paho.on_connect = lambda c, u, f, rc, p: self._on_connect(rc)
        self.paho.on_disconnect = lambda c, u, f, rc, p: self._on_disconnect()
        self.paho.on_message = lambda c, u, m: self._on_message(m)
        self.paho.on_socket_open = lambda c, u, s: fleet.watch(s, self, write=False)
        self.paho.on_socket_close = lambda c, u, s: fleet.forget(s)
        self.paho.on_socket_register_write = lambda c, u, s: fleet.watch(s, self, write=True)
        self.paho.on_socket_unregister_write = lambda c, u, s: fleet.watch(s, self, write=False)

    def start(self, host: str, port: int) -> None:
        topic, _, will = self.device.presence()
        self.paho.will_set(topic, will, qos=1, retain=True)
        try:
            self.paho.connect(host, port, KEEPALIVE_S)
        except OSError as exc:
            log.warning("%s: connect failed (%s); retrying in 5 s", self.device.device_id, exc)
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
        self.connected = False

    # ---- Port -------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.paho.publish(topic, payload, qos=1, retain=retain)

    def subscribe(self, filters: list[str]) -> None:
        self.paho.subscribe([(f, 1) for f in filters])

    def unsubscribe(self, filters: list[str]) -> None:
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
        self.host, self.port = parse_url(config.url)[:2]
        raise_open_files(config.devices + 64)
        self.selector = selectors.DefaultSelector()
        names = [f"{config.name_prefix}-{i}" for i in range(config.first, config.first + config.devices)]
        self.clients = [_Client(self, name, shared, config.behaviour) for name in names]
        self._timers: list[tuple[float, int, _Client]] = []
        self.busy: set[_Client] = set()  # devices with a task pending: only they are ticked
        self._stop = False
        self.rng = random.Random(config.first)

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
                pending.pop().start(self.host, self.port)
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
                client.start(self.host, self.port)

    def counts(self) -> dict[str, int]:
        devices = [c.device for c in self.clients]
        return {"devices": len(devices), "connected": sum(c.connected for c in self.clients),
                "updates_sent": sum(d.updates_sent for d in devices),
                "errors_sent": sum(d.errors_sent for d in devices),
                "peak_rss_mib": int(peak_rss_mib() or 0)}

    def _leave(self, timeout_s: float = 10.0) -> None:
        """Offline statuses (retained) and DISCONNECTs, served until written or `timeout_s` passes."""
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
