"""`edgeftl device supervise --root R`: keep a flashed device agent running, without systemd.

Reads <root>/config/agent.json ({"argv": [...], "env": {...}}, written by the flash), runs
`<root>/current/bin/edgeftl device run <argv...>` as its child and appends the child's output
to <root>/log/agent.log (rotated at 8 MiB, one .1 kept). An exit != 0 restarts the agent after
1, 2, 4 ... 60 s (back to 1 s once it ran a minute); an exit 0 (`--rounds N` done) ends the
supervisor; SIGTERM stops the agent (SIGKILL after 10 s) and then the supervisor. It writes
run/supervisor.pid and run/status.json {pid, child_pid, started, restarts, last_exit, last_line,
state}, which the target's installer reads (device/installer.py). Without --foreground it
daemonises and returns once the pid file is written. Standard library only: it runs for the
agent's whole life, so it must not hold numpy or onnxruntime in memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from edgeftl.device.files import atomic_write

LOG_ROTATE_BYTES = 8 * 1024 * 1024
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
HEALTHY_RUN_S = 60.0  # an agent that ran this long before failing starts again from the first backoff
STOP_GRACE_S = 10


@dataclass(frozen=True)
class AgentConfig:
    """What the service runs: `edgeftl device run <argv>` with `env` added to the environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.argv, list) or not all(isinstance(a, str) for a in self.argv):
            raise ValueError(f"agent.json 'argv' must be a list of strings, got {self.argv!r}")
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in self.env.items()):
            raise ValueError("agent.json 'env' must map names to strings")

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the agent config {path}: {exc}; flash the target again") from None
        if not isinstance(record, dict) or set(record) - {"argv", "env"}:
            raise ValueError(f"{path} must be {{\"argv\": [...], \"env\": {{...}}}}, got keys {sorted(record)}")
        return cls(record.get("argv"), record.get("env", {}))  # type: ignore[arg-type]


def backoff_delays() -> list[float]:
    """1, 2, 4 ... seconds up to 60: the waits before restarts 1, 2, 3 ... of a failing agent."""
    delays = [FIRST_BACKOFF_S]
    while delays[-1] < MAX_BACKOFF_S:
        delays.append(min(MAX_BACKOFF_S, delays[-1] * 2))
    return delays


class RotatingLog:
    """Appends to log/agent.log, moving it to agent.log.1 past LOG_ROTATE_BYTES."""

    def __init__(self, path: Path, redirect_stdio: bool, limit: int = LOG_ROTATE_BYTES) -> None:
        self.path, self.redirect_stdio, self.limit = path, redirect_stdio, limit
        self._open()

    def _open(self) -> None:
        self.handle = open(self.path, "ab", buffering=0)
        if self.redirect_stdio:  # a daemon's own tracebacks follow the log across rotations
            os.dup2(self.handle.fileno(), 1)
            os.dup2(self.handle.fileno(), 2)

    def write(self, data: bytes) -> None:
        if self.handle.tell() + len(data) > self.limit and self.handle.tell() > 0:
            self.handle.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._open()
        self.handle.write(data)

    def note(self, text: str) -> None:
        self.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} edgeftl supervise: {text}\n".encode())


class Supervisor:
    """One agent child at a time, restarted with backoff; its state in run/status.json."""

    def __init__(self, root: Path, config: AgentConfig, log: RotatingLog) -> None:
        self.root, self.config, self.log = root, config, log
        self.status: dict = {"pid": os.getpid(), "child_pid": None, "started": round(time.time(), 3), "restarts": 0,
                             "last_exit": None, "last_line": None, "state": "starting"}
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self._pending = b""

    def run(self, ready: Callable[[], None]) -> int:
        """Supervise until the agent exits 0 or SIGTERM arrives; `ready` is called once the pid file exists."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGALRM, self._kill)
        self._write_status("starting")
        pid_file = self.root / "run" / "supervisor.pid"
        atomic_write(pid_file, f"{os.getpid()}\n", mode=0o644)
        ready()
        try:
            self._loop()
        finally:
            self._write_status("stopped" if self.stopping else "exited")
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
            self.log.note(f"supervisor ends ({'stopped' if self.stopping else 'agent finished'})")
        return 0

    def _loop(self) -> None:
        delays, failures = backoff_delays(), 0
        while not self.stopping:
            started = time.monotonic()
            code = self._run_child()
            self.status["last_exit"] = code
            if self.stopping or code == 0:
                return
            failures = 0 if time.monotonic() - started >= HEALTHY_RUN_S else failures
            delay = delays[min(failures, len(delays) - 1)]
            failures += 1
            self.log.note(f"agent exited with code {code}; restart {self.status['restarts'] + 1} in {delay:g} s")
            self._write_status("backoff")
            deadline = time.monotonic() + delay
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.stopping:
                self.status["restarts"] += 1

    def _run_child(self) -> int:
        argv = [str(self.root / "current" / "bin" / "edgeftl"), "device", "run", *self.config.argv]
        try:
            self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env={**os.environ, **self.config.env},
                                          cwd=self.root)
        except OSError as exc:
            self.status["last_line"] = f"cannot start {argv[0]}: {exc.strerror}"
            self.log.note(self.status["last_line"])
            return 127
        self.status["child_pid"] = self.child.pid
        self._write_status("running")
        self.log.note(f"agent started (pid {self.child.pid})")
        assert self.child.stdout is not None
        while chunk := os.read(self.child.stdout.fileno(), 65536):
            self.log.write(chunk)
            self._track_last_line(chunk)
        code = self.child.wait()
        signal.alarm(0)
        self.child.stdout.close()
        self.child, self.status["child_pid"] = None, None
        return code

    def _track_last_line(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).replace(b"\r", b"\n").split(b"\n")
        self._pending = lines.pop()[-4096:]
        complete = [line.strip() for line in lines if line.strip()]
        if complete:
            self.status["last_line"] = complete[-1].decode("utf-8", "replace")[:300]

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.returncode is None:
            self.child.send_signal(signal.SIGTERM)
            signal.alarm(STOP_GRACE_S)

    def _kill(self, signum: int, frame: FrameType | None) -> None:
        if self.child is not None and self.child.returncode is None:
            self.child.kill()

    def _write_status(self, state: str) -> None:
        self.status["state"] = state
        atomic_write(self.root / "run" / "status.json", json.dumps(self.status, sort_keys=True), mode=0o644)


def supervise(root: Path, foreground: bool) -> int:
    """Run the supervisor for the install at `root`: here (systemd's way) or as a daemon.

    Raises:
        ValueError: no readable config/agent.json, or a supervisor already runs there.
    """
    from edgeftl.device.installer import supervisor_pid

    root = Path(os.path.abspath(root))
    config = AgentConfig.load(root / "config" / "agent.json")
    running = supervisor_pid(root)
    if running is not None:
        raise ValueError(f"a supervisor already runs for {root} (pid {running}): stop it first")
    for folder in ("log", "run"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    log_path = root / "log" / "agent.log"
    if foreground:
        return Supervisor(root, config, RotatingLog(log_path, redirect_stdio=False)).run(lambda: None)
    return _daemonize(root, lambda ready: Supervisor(root, config, RotatingLog(log_path, True)).run(ready))


def _daemonize(root: Path, body: Callable[[Callable[[], None]], int]) -> int:
    """Double fork and setsid; the caller returns 0 once the daemon says it is ready (pid file written)."""
    read_fd, write_fd = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace")
        os.waitpid(first, 0)
        if message.startswith("ok "):
            print(f"edgeftl supervise: running for {root} (pid {message[3:]}), log in {root}/log/agent.log")
            return 0
        print(f"edgeftl: error: {message or 'the supervisor died while starting'}", file=sys.stderr)
        return 2
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir(root)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code, told = 1, False

    def ready() -> None:
        nonlocal told
        os.write(write_fd, f"ok {os.getpid()}".encode())
        os.close(write_fd)
        told = True

    try:
        code = body(ready)
    except BaseException as exc:  # after setsid nobody else reports it: the log and the waiting parent do
        import traceback

        traceback.print_exc()
        if not told:
            os.write(write_fd, f"{type(exc).__name__}: {exc}".encode()[:1000])
    finally:
        os._exit(code)
