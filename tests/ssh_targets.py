"""Real SSH targets for the flash tests: OpenSSH's sshd on free loopback ports, with throwaway keys.

A test module asks for the session's server with ``pytest_plugins = ["ssh_targets"]`` and the
``ssh_server`` fixture, then takes targets from it; each is a fresh folder behind an ssh:// URL:

    target = ssh_server.plain("first")        # this host, a folder under the session's tmp
    ssh_server.no_python("x")                 # a chroot holding bash and sh only
    ssh_server.arm64("x")                     # the emulated Debian bookworm ARM64 root, under qemu-user
    ssh_server.memory_limited("x")            # this host, sessions inside a 160 MiB memory cgroup
    ssh_server.full_disk_root(), ssh_server.read_only_root()
    ssh_server.unreachable_url("/x"), ssh_server.wrong_identity()
    ssh(target, "uname -m").stdout

The sshds start when first asked for (the ARM64 one runs in a mount namespace of its own with
/proc mounted in the root); at the end everything the sessions left running under the session's
folders is killed, then the sshds stop and mounts, cgroups and roots go. Needs /usr/sbin/sshd
(`make sshd`); every kind but plain needs root. Skips say why, and fail instead under CI.

PYTEST_DONT_REWRITE: a plugin imported by its test modules first; it holds no test assertions.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import emulated_root
import ssh_places
from conftest import in_ci
from ssh_sshd import Sshd

MEMORY_LIMIT_MIB = 160
SESSION_ENV = "EDGEFTL_SSH_SESSION"  # set in every session: how teardown knows what the sessions started
SSH_TIMEOUT_S = 120.0
ARM64_SUITE = "bookworm"


@dataclass(frozen=True)
class Target:
    """One place to flash: its ssh:// URL, the client key and known_hosts that reach it."""

    url: str  # ssh://user@127.0.0.1:PORT/path
    identity: Path
    known_hosts: Path
    chroot: Path | None = None  # where the sessions' / lies on this host; None: this host's /

    @property
    def path(self) -> str:
        """The target folder as the sessions see it."""
        return urlsplit(self.url).path

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 22)

    def host_path(self, guest_path: str) -> Path:
        """Where a path the sessions see lies on this host."""
        return self.chroot / guest_path.lstrip("/") if self.chroot else Path(guest_path)


def ssh_options(target: Target) -> list[str]:
    """The ssh options that reach target non-interactively with only its key and known_hosts."""
    return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", str(target.identity),
            "-o", f"UserKnownHostsFile={target.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", "-p", str(target.port)]


def ssh(target: Target, command: str, *, input: str | None = None,
        timeout: float = SSH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run command on target through ssh (exit 255: ssh itself failed); output captured as text."""
    parts = urlsplit(target.url)
    return subprocess.run(["ssh", *ssh_options(target), f"{parts.username}@{parts.hostname}", command],
                          input=input, capture_output=True, text=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def unavailable(reason: str) -> NoReturn:
    """Skip the test for a missing requirement; under CI, fail instead (nothing may hide there)."""
    if in_ci():
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


def keygen(path: Path) -> Path:
    """A throwaway ed25519 key pair at path and path.pub; returns path."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeftl-tests", "-f", str(path)],
                   check=True, capture_output=True)
    return path


class SshServer:
    """The session's sshds and the targets behind them; close() undoes everything it made."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.token = uuid.uuid4().hex[:10]
        self.user = getpass.getuser()
        # Every target folder's path holds this name: teardown's kill matches it, and only it.
        self.folders = work / f"edgeftl-ssh-{self.token}"
        self.folders.mkdir()
        self.host_key = keygen(work / "host_ed25519")
        self.identity = keygen(work / "client_ed25519")
        (work / "authorized_keys").write_text(Path(f"{self.identity}.pub").read_text())
        self.known_hosts = work / "known_hosts"
        self.known_hosts.write_text("")
        self._sshds: dict[str, Sshd] = {}
        self._cleanups: list[tuple[str, Callable[[], object]]] = []  # (what, undo) run in reverse at close
        self._names: set[str] = set()
        self._closed_port = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused

    # -- targets --------------------------------------------------------------------------------

    def plain(self, name: str = "target") -> Target:
        """A fresh folder on this host."""
        return self._target(self._sshd("plain"), str(self._fresh(name)))

    def no_python(self, name: str = "target") -> Target:
        """A fresh folder in a chroot that holds bash and sh only (no python3)."""
        self._need_root("the target without Python (a chroot)")
        sshd = self._sshd("plain")
        port, chroot = sshd.ports[1], sshd.chroots[1]
        assert chroot is not None
        guest = f"/srv/{self.folders.name}/{self._unique(name)}"
        (chroot / guest.lstrip("/")).mkdir(parents=True)
        return self._target(sshd, guest, port=port, chroot=chroot)

    def arm64(self, name: str = "target") -> Target:
        """A fresh folder in the emulated ARM64 Debian root: every session command is an ARM64 binary."""
        sshd = self._sshd("arm64")
        chroot = sshd.chroots[0]
        assert chroot is not None
        guest = f"/tmp/{self.folders.name}/{self._unique(name)}"
        (chroot / guest.lstrip("/")).mkdir(parents=True)
        return self._target(sshd, guest, chroot=chroot)

    def memory_limited(self, name: str = "target") -> Target:
        """A fresh folder on this host; sessions run in a MEMORY_LIMIT_MIB memory cgroup."""
        return self._target(self._sshd("memory"), str(self._fresh(name)))

    def full_disk_root(self) -> Target:
        """A 2 MiB tmpfs on this host, full but a few KiB, as the target folder."""
        self._need_root("a full disk (a tmpfs mount)")
        folder = ssh_places.mount_full_tmpfs(self.folders / self._unique("full-disk"))
        self._cleanups.append((f"unmount {folder}", lambda: ssh_places.unmount(folder)))
        return self._target(self._sshd("plain"), str(folder))

    def read_only_root(self) -> Target:
        """A read-only tmpfs on this host as the target folder."""
        self._need_root("a read-only disk (a tmpfs mount)")
        folder = ssh_places.mount_read_only_tmpfs(self.folders / self._unique("read-only"))
        self._cleanups.append((f"unmount {folder}", lambda: ssh_places.unmount(folder)))
        return self._target(self._sshd("plain"), str(folder))

    def unreachable_url(self, path: str = "/srv/edgeftl") -> str:
        """An ssh:// URL on a loopback port where nothing listens (connections are refused)."""
        return f"ssh://{self.user}@127.0.0.1:{self._closed_port.getsockname()[1]}/{path.lstrip('/')}"

    def wrong_identity(self) -> Path:
        """A private key no target accepts."""
        key = self.work / "stranger_ed25519"
        return key if key.exists() else keygen(key)

    # -- making and ending ----------------------------------------------------------------------

    def _unique(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"target name {name!r}: use a plain folder name (no '/', not starting with '.')")
        unique, n = name, 1
        while unique in self._names:
            n += 1
            unique = f"{name}-{n}"
        self._names.add(unique)
        return unique

    def _fresh(self, name: str) -> Path:
        folder = self.folders / self._unique(name)
        folder.mkdir()
        return folder

    def _target(self, sshd: Sshd, guest: str, port: int | None = None, chroot: Path | None = None) -> Target:
        return Target(f"ssh://{self.user}@127.0.0.1:{port or sshd.port}{guest}", self.identity,
                      self.known_hosts, chroot)

    def _need_root(self, what: str) -> None:
        if os.geteuid() != 0:
            unavailable(f"{what} needs root")

    def _sshd(self, kind: str) -> Sshd:
        if kind not in self._sshds:
            self._sshds[kind] = getattr(self, f"_start_{kind}")()
            self._write_known_hosts()
        return self._sshds[kind]

    def _settings(self) -> dict[str, str]:
        return {"host_key": str(self.host_key), "authorized_keys": str(self.work / "authorized_keys"),
                "session_env": f"{SESSION_ENV}={self.token}"}

    def _start_plain(self) -> Sshd:
        if os.geteuid() != 0:  # plain still works as this user, without the chroot
            return Sshd.start(self.work / "sshd-plain", self._settings())
        chroot = Path(tempfile.mkdtemp(prefix=f"{self.folders.name}-", dir=self._chroot_parent()))
        self._cleanups.append((f"remove {chroot}", lambda: shutil.rmtree(chroot)))
        ssh_places.make_shell_root(chroot / "root")
        return Sshd.start(self.work / "sshd-plain", self._settings(), chroots=[None, chroot / "root"])

    def _start_arm64(self) -> Sshd:
        self._need_root("the emulated ARM64 target (chroot, binfmt_misc, mounting /proc)")
        try:
            board = emulated_root.board(ARM64_SUITE, "arm64", emulated_root.device_requirements(),
                                        log=lambda m: print(f"ssh_targets: {m}", file=sys.stderr))
            ssh_places.check_chroot_path(board.root)
        except (emulated_root.RootError, ssh_places.PlaceError) as exc:
            unavailable(f"no emulated ARM64 root: {exc}")
        session_folder = board.host_path(f"/tmp/{self.folders.name}")
        self._cleanups.append((f"remove {session_folder}", lambda: shutil.rmtree(session_folder, True)))
        # As emulated_root.Board.command runs a board: a private mount namespace where /proc (ONNX
        # Runtime and the probe read /proc/meminfo) and a /dev/shm are mounted, and vanish with it.
        # No /sys: given the host's x86 /sys, ONNX Runtime crashed under emulation.
        script = 'mount -t proc proc "$0/proc" && mount -t tmpfs -o mode=1777 shm "$0/dev/shm" && exec "$@"'
        return Sshd.start(self.work / "sshd-arm64", self._settings(), chroots=[board.root],
                          env={"QEMU_CPU": emulated_root.QEMU_CPU["arm64"]},
                          prefix=["unshare", "--mount", "--fork", "sh", "-c", script, str(board.root)])

    def _start_memory(self) -> Sshd:
        self._need_root("the memory-limited target (a memory cgroup)")
        try:
            cgroup = ssh_places.make_memory_cgroup(MEMORY_LIMIT_MIB)
        except ssh_places.PlaceError as exc:
            unavailable(str(exc))
        self._cleanups.append((f"remove cgroup {cgroup}", lambda: ssh_places.remove_cgroup(cgroup)))
        # sshd joins the cgroup before it starts: every session it forks inherits the limit.
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return Sshd.start(self.work / "sshd-memory", self._settings(), prefix=["sh", "-c", join, str(cgroup)])

    def _chroot_parent(self) -> Path:
        """A folder for chroots: sshd wants root's folders all the way up, which /tmp (1777) is not."""
        parent = Path.home() / ".cache" / "edgeftl" / "ssh-targets"
        parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            ssh_places.check_chroot_path(parent)
        except ssh_places.PlaceError as exc:
            unavailable(str(exc))
        return parent

    def _write_known_hosts(self) -> None:
        key = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        ports = sorted({p for s in self._sshds.values() for p in s.ports})
        temp = self.known_hosts.with_suffix(".tmp")
        temp.write_text("".join(f"[127.0.0.1]:{port} {key}\n" for port in ports))
        temp.replace(self.known_hosts)

    def close(self) -> None:
        """Kill what the sessions left running, stop the sshds, then undo mounts, cgroups and roots."""
        problems = []
        marks = [self.folders.name.encode(), f"{SESSION_ENV}={self.token}".encode()]
        spare = {pid for s in self._sshds.values() for pid in s.pids()}
        killed = ssh_places.kill_session_processes(marks, spare)
        if killed:
            print(f"ssh_targets: killed {len(killed)} processes the sessions left: {killed}", file=sys.stderr)
        for sshd in self._sshds.values():
            sshd.stop()
        for what, undo in reversed(self._cleanups):
            try:
                undo()
            except (OSError, ssh_places.PlaceError) as exc:
                problems.append(f"{what}: {exc}")
        self._closed_port.close()
        if problems:
            raise RuntimeError("ssh_targets teardown: " + "; ".join(problems))


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """The session's SSH targets (see the module's docstring); skips without sshd (fails under CI)."""
    if not Path(Sshd.BINARY).is_file():
        unavailable(f"{Sshd.BINARY} is not installed: run `make sshd` (apt-get install -y openssh-server)")
    server = SshServer(tmp_path_factory.mktemp("ssh-targets"))
    try:
        yield server
    finally:
        server.close()
