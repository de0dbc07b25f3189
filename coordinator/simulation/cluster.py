"""A clustered MQTT broker on this machine: 3 NATS servers (Debian `nats-server`) with JetStream and MQTT.

NATS keeps MQTT sessions, QoS 1 messages and retained messages in JetStream streams replicated to
min(3, nodes) servers (docs/BROKERS.md), so a client may reconnect to any node and find its session,
what was queued for it, and every retained status, task and global. Each node listens for MQTT, for
NATS clients, for routes (the cluster) and for HTTP monitoring (its /healthz is the readiness check),
all on free loopback ports, with its JetStream store under a temporary folder.

    with NatsCluster(3) as cluster:
        cluster.urls          # ["mqtt://127.0.0.1:P1", ...]; cluster.broker_list joins them with commas
        cluster.kill(1)       # SIGKILL node 1, as a crash or a lost machine looks to the others
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edgeftl.coordinator.simulation.broker import free_port

START_TIMEOUT_S = 60.0
CLUSTER_NAME = "edgeftl"


def nats_binary() -> str | None:
    """The nats-server executable (Debian puts it in /usr/sbin, which a user's PATH may lack), or None."""
    found = shutil.which("nats-server")
    if found:
        return found
    return next((str(p) for p in (Path("/usr/sbin/nats-server"), Path("/usr/local/bin/nats-server")) if p.is_file()),
                None)


@dataclass(frozen=True)
class NodePorts:
    client: int
    route: int
    mqtt: int
    http: int


def node_config(name: str, ports: NodePorts, routes: list[int], store: Path, replicas: int) -> str:
    """One node's nats-server configuration: JetStream on, routes to every node, an MQTT listener whose
    streams keep `replicas` copies. max_payload stays at NATS's 1 MB: our chunks are 256 KiB."""
    route_urls = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
    return "\n".join([
        f"server_name: {name}",
        f"listen: 127.0.0.1:{ports.client}",
        f"http: 127.0.0.1:{ports.http}",
        f'jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: 4GB }}',
        f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{ports.route}, routes: [{route_urls}] }}",
        f"mqtt {{ listen: 127.0.0.1:{ports.mqtt}, stream_replicas: {replicas} }}",
        "",
    ])


class NatsCluster:
    """`nodes` NATS servers forming one cluster on free loopback ports; start/stop/kill/restart by index.

    Args:
        nodes: servers in the cluster (3: one may fail and the replicated streams keep a quorum).
        folder: where configurations, logs and JetStream stores go (default: a temporary folder).
    """

    def __init__(self, nodes: int = 3, folder: Path | None = None) -> None:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed: apt-get install -y nats-server (or `make nats`)")
        if not 1 <= nodes <= 7:
            raise ValueError(f"a cluster here has 1..7 nodes, got {nodes}")
        self.binary, self.nodes = binary, nodes
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="edgeftl-nats-")
        self.folder = Path(folder) if folder else Path(self._tmp.name)  # type: ignore[union-attr]
        self.ports = [NodePorts(free_port(), free_port(), free_port(), free_port()) for _ in range(nodes)]
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        replicas = min(3, nodes)
        for index, ports in enumerate(self.ports):
            store = self.folder / f"n{index}" / "store"
            store.mkdir(parents=True, exist_ok=True)
            routes = [p.route for p in self.ports]
            self.conf(index).write_text(node_config(f"n{index}", ports, routes, store, replicas))

    @property
    def urls(self) -> list[str]:
        return [f"mqtt://127.0.0.1:{p.mqtt}" for p in self.ports]

    @property
    def broker_list(self) -> str:
        """What --broker takes for the whole cluster."""
        return ",".join(self.urls)

    def conf(self, index: int) -> Path:
        return self.folder / f"n{index}" / "nats.conf"

    def log(self, index: int) -> Path:
        return self.folder / f"n{index}" / "nats.log"

    def pid(self, index: int) -> int | None:
        proc = self._procs[index]
        return proc.pid if proc is not None and proc.poll() is None else None

    def __enter__(self) -> NatsCluster:
        try:
            for index in range(self.nodes):
                self.start(index, wait=False)
            self.wait_ready(range(self.nodes))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for index in range(self.nodes):
            self.stop(index)
        if self._tmp is not None:
            self._tmp.cleanup()

    def start(self, index: int, wait: bool = True) -> None:
        """Start node `index` (again, after stop or kill: it rejoins with its store)."""
        if self.pid(index) is not None:
            return
        with self.log(index).open("ab") as out:
            self._procs[index] = subprocess.Popen([self.binary, "-c", str(self.conf(index))], stdout=out,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready([index])

    def stop(self, index: int) -> None:
        """Graceful: SIGTERM, then SIGKILL after 10 s."""
        proc = self._procs[index]
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs[index] = None

    def kill(self, index: int) -> None:
        """SIGKILL node `index`: no goodbye to its peers or clients (and so no wills from it)."""
        proc = self._procs[index]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        self._procs[index] = None

    def wait_ready(self, indices: range | list[int], timeout_s: float = START_TIMEOUT_S) -> None:
        """Until each node's /healthz says ok (JetStream has a meta leader and its streams are current)
        and one MQTT client has connected to it: a node sets up its MQTT streams and reads the retained
        messages at its first MQTT connection, and a subscriber that came first could miss them."""
        end = time.monotonic() + timeout_s
        for index in indices:
            while not self._healthy(index):
                proc = self._procs[index]
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"nats-server node {index} exited: {self._tail(index)}")
                if time.monotonic() > end:
                    raise RuntimeError(f"nats-server node {index} not healthy within {timeout_s:.0f} s: "
                                       f"{self._tail(index)}")
                time.sleep(0.1)
            self._warm_up(index, max(1.0, end - time.monotonic()))

    def _healthy(self, index: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[index].http}/healthz", timeout=1) as reply:
                return json.loads(reply.read() or b"{}").get("status") == "ok"
        except (OSError, ValueError):
            return False

    def _warm_up(self, index: int, timeout_s: float) -> None:
        """Connect and subscribe one throwaway MQTT client; retried while the cluster elects leaders."""
        end = time.monotonic() + timeout_s
        while not _subscribes("127.0.0.1", self.ports[index].mqtt, f"edgeftl-warmup-n{index}"):
            if time.monotonic() > end:
                raise RuntimeError(f"nats-server node {index} accepted no MQTT subscriber within {timeout_s:.0f} s: "
                                   f"{self._tail(index)}")
            time.sleep(0.5)

    def _tail(self, index: int, lines: int = 3) -> str:
        try:
            return " | ".join(self.log(index).read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _subscribes(host: str, port: int, client_id: str, timeout_s: float = 10.0) -> bool:
    """True when a clean-session client connects to host:port and its subscription is granted."""
    granted = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else c.subscribe("edgeftl-warmup/probe", 1)
    client.on_subscribe = lambda c, u, mid, rcs, p: granted.set() if not any(r.is_failure for r in rcs) else None
    try:
        client.connect(host, port, 10)
    except OSError:
        return False
    client.loop_start()
    try:
        return granted.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
