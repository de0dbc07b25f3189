"""One OpenSSH sshd for the tests: free loopback ports, a throwaway host key, a config of its own.

Each listening port may lead into a chroot (`Match LocalPort` + `ChrootDirectory`); `prefix`
runs sshd inside something (a mount namespace, a cgroup), so everything its sessions start
inherits that. tests/ssh_targets.py makes the targets; this only starts and stops the daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from conftest import _free_port

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start as root without it


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            return conn.recv(4).startswith(b"SSH-")  # the server's banner: really sshd, really up
    except OSError:
        return False


def sshd_config(ports: Sequence[int], chroots: Sequence[Path | None], settings: dict[str, str],
                env: dict[str, str], pid_file: Path) -> str:
    """sshd_config text: loopback only, public keys only, the session's environment, chroots per port."""
    lines = [*(f"ListenAddress 127.0.0.1:{port}" for port in ports),
             f"HostKey {settings['host_key']}", f"PidFile {pid_file}",
             f"AuthorizedKeysFile {settings['authorized_keys']}",
             "UsePAM no", "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
             "PasswordAuthentication no", "KbdInteractiveAuthentication no",
             # The keys and folders live in pytest's tmp; flash opens many sessions at once.
             "StrictModes no", "PrintMotd no", "MaxStartups 64", "MaxSessions 64",
             "Subsystem sftp internal-sftp",
             "SetEnv " + " ".join([settings["session_env"], *(f"{k}={v}" for k, v in env.items())])]
    for port, chroot in zip(ports, chroots):
        if chroot is not None:
            lines += [f"Match LocalPort {port}", f"    ChrootDirectory {chroot}"]
    return "\n".join(lines) + "\n"


@dataclass
class Sshd:
    """A running sshd: ports[i] leads into chroots[i] (None: this host's /)."""

    BINARY: ClassVar[str] = "/usr/sbin/sshd"

    process: subprocess.Popen[bytes]
    ports: list[int]
    chroots: list[Path | None]
    folder: Path  # its config, pid file and log

    @property
    def port(self) -> int:
        return self.ports[0]

    @classmethod
    def start(cls, folder: Path, settings: dict[str, str], chroots: Sequence[Path | None] = (None,),
              env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> Sshd:
        """Start sshd (`-D -e`) on one free port per entry of chroots; retries when a port was taken meanwhile.

        Raises:
            RuntimeError: it did not start; the message holds its log's last lines.
        """
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        problems = []
        for attempt in range(3):
            ports = [_free_port() for _ in chroots]
            config = folder / f"sshd-{attempt}.conf"
            config.write_text(sshd_config(ports, chroots, settings, env or {}, folder / "sshd.pid"))
            log = folder / f"sshd-{attempt}.log"
            with log.open("wb") as out:
                process = subprocess.Popen([*prefix, cls.BINARY, "-D", "-e", "-f", str(config)],
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            sshd = cls(process, ports, list(chroots), folder)
            if sshd._wait_up(ports):
                return sshd
            sshd.stop()
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
            problems.append(f"ports {ports}: exit code {process.returncode}, log: {tail}")
        raise RuntimeError("sshd did not start: " + "; ".join(problems))

    def _wait_up(self, ports: list[int]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = list(ports)
        while waiting and time.monotonic() < deadline and self.process.poll() is None:
            waiting = [port for port in waiting if not _accepts(port)]
            if waiting:
                time.sleep(0.05)
        return not waiting

    def pids(self) -> set[int]:
        """The listening sshd and whatever wraps it (the prefix's processes)."""
        pids = {self.process.pid}
        try:
            listener = int((self.folder / "sshd.pid").read_text())
            # A stale pid file's number may belong to someone else by now.
            if str(self.folder).encode() in Path(f"/proc/{listener}/cmdline").read_bytes():
                pids.add(listener)
        except (OSError, ValueError):
            pass
        return pids

    def stop(self) -> None:
        """SIGTERM the listener (the prefix exits with it), SIGKILL after STOP_TIMEOUT_S."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(timeout=STOP_TIMEOUT_S)
        (self.folder / "sshd.pid").unlink(missing_ok=True)
