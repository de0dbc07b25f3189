"""Shared fixtures: a real Mosquitto broker on a free loopback port, a 3-node NATS cluster, and marker skips."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from edgeftl.coordinator.simulation.cluster import NatsCluster

BROKER_START_TIMEOUT_S = 10.0
# Debian puts mosquitto in /usr/sbin, which a non-root user's PATH often lacks.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def in_ci() -> bool:
    """True when the CI environment variable is set (CI must fail, never skip, on setup)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _start_broker(binary: str, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start mosquitto on a free port; retry when another process took the port meanwhile."""
    problems: list[str] = []
    for attempt in range(3):
        port = _free_port()
        conf = folder / f"mosquitto-{attempt}.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\n"
        )
        log = folder / f"mosquitto-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _accepts(port):
                return proc, port
            time.sleep(0.05)
        _stop(proc)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        problems.append(f"port {port}: exit code {proc.returncode}, log: {' | '.join(tail)}")
    raise RuntimeError("mosquitto did not start: " + "; ".join(problems))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real Mosquitto broker for the test session, as ``("127.0.0.1", port)``.

    Anonymous, no persistence, loopback only. Skips when mosquitto is not installed, except
    under CI, where it fails so a missing broker cannot hide the MQTT tests.
    """
    binary = mosquitto_binary()
    if binary is None:
        reason = "mosquitto is not installed: run `make mosquitto` (apt-get install -y mosquitto)"
        if in_ci():
            pytest.fail(f"CI is set and {reason}", pytrace=False)
        pytest.skip(reason)
    proc, port = _start_broker(binary, tmp_path_factory.mktemp("mosquitto"))
    try:
        yield ("127.0.0.1", port)
    finally:
        _stop(proc)


@pytest.fixture()
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node NATS cluster (JetStream, MQTT; coordinator/simulation/cluster.py) for one test:
    tests kill nodes. Skips when nats-server is not installed, except under CI, where it fails."""
    from edgeftl.coordinator.simulation.cluster import NatsCluster, nats_binary

    if nats_binary() is None:
        reason = "nats-server is not installed: run `make nats` (apt-get install -y nats-server)"
        if in_ci():
            pytest.fail(f"CI is set and {reason}", pytrace=False)
        pytest.skip(reason)
    with NatsCluster(3, tmp_path / "nats") as cluster:
        yield cluster


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests, with a reason, on machines without CUDA."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # do not pay for importing torch when no test needs a GPU
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)
