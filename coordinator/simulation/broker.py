"""Brokers the simulator can start itself: embedded amqtt (pure Python) or a Mosquitto process."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"broker did not open 127.0.0.1:{port} within {timeout_s:.0f} s")


class EmbeddedBroker:
    """amqtt running on its own event loop thread, on a free loopback port."""

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.log_file = log_file
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise RuntimeError("the embedded broker needs amqtt: pip install 'edgeftl[sim]', "
                               "or pass --broker URL") from exc
        if self.log_file is not None:
            # amqtt logs its QoS 1 retries ("Timeout waiting for PUBACK") with tracebacks; they go
            # to the run folder instead of the user's terminal.
            handler = logging.FileHandler(self.log_file)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            for name in ("amqtt", "asyncio"):
                logger = logging.getLogger(name)
                logger.addHandler(handler)
                logger.propagate = False
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}",
                                            "max_connections": 256}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        self._thread.start()

        async def start() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        # start() returns once the listener is bound; no probe connection (amqtt logs those as errors).
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(20)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
            except Exception:  # shutting down: nothing left to protect
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class MosquittoBroker:
    """A private Mosquitto on a free loopback port (Debian package `mosquitto`)."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto (or use the embedded broker)")
        self.binary, self.port = binary, port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="edgeftl-mosquitto-")
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> MosquittoBroker:
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "message_size_limit 0\nmax_queued_messages 10000\n")
        self._process = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10)
        return self

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (for measuring its memory), else None."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._dir.cleanup()
