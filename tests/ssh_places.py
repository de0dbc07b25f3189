"""The odd places tests/ssh_targets.py serves SSH sessions in: a root without Python, a memory cgroup,
tmpfs mounts that are full or read-only, and the clean-up of whatever a session left running.

Plain helpers (no pytest): each returns what it made and has an undo beside it. All need root.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Collection
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")
KILL_GRACE_S = 3.0


class PlaceError(RuntimeError):
    """A place cannot be made on this machine; the message says why."""


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise PlaceError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")


def check_chroot_path(folder: Path) -> None:
    """sshd's ChrootDirectory rule: the folder and every parent are root's and writable by root only."""
    for part in [folder, *folder.parents]:
        st = part.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise PlaceError(f"{part} (uid {st.st_uid}, mode {st.st_mode & 0o7777:o}) cannot lead to an sshd "
                             f"ChrootDirectory ({folder}): every folder on the way must be root's, 0755 or less")


# -- a root without Python -------------------------------------------------------------------

def _shared_libraries(binary: str) -> list[str]:
    """The absolute paths ldd lists for binary (the loader included)."""
    done = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    found = []
    for line in done.stdout.splitlines():
        words = [w for w in line.replace("=>", " ").split() if w.startswith("/")]
        found.extend(words[:1])
    return found


def make_shell_root(root: Path) -> Path:
    """A root holding bash, dash as /bin/sh, their libraries, /dev/null and a writable /tmp: no Python."""
    bash, dash = shutil.which("bash"), shutil.which("dash")
    if not bash or not dash:
        raise PlaceError("a root without Python needs bash and dash on this host")
    copies = {"/bin/bash": bash, "/bin/sh": dash}
    for binary in (bash, dash):
        copies.update({lib: lib for lib in _shared_libraries(binary)})
    for inside, source in copies.items():
        place = root / inside.lstrip("/")
        place.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(source), place)
    (root / "dev").mkdir(mode=0o755)
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))  # character device 1,3
    os.chmod(root / "dev/null", 0o666)  # mknod honours the umask
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "root").mkdir(mode=0o700)  # root's home: sshd changes into it
    return root


# -- a memory cgroup -------------------------------------------------------------------------

def own_memory_cgroup() -> tuple[Path, int]:
    """(this process's memory cgroup folder, cgroup version 1 or 2), from /proc/self/cgroup."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    if (CGROUP_FS / "cgroup.controllers").is_file():  # the unified (v2) hierarchy
        path = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
        if path is not None:
            return CGROUP_FS / path.lstrip("/"), 2
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_FS / "memory" / path.lstrip("/"), 1
    raise PlaceError("no memory cgroup in /proc/self/cgroup: this kernel or container has no memory controller")


def make_memory_cgroup(limit_mib: int) -> Path:
    """A child of this process's memory cgroup limited to limit_mib (swap included where it is counted)."""
    parent, version = own_memory_cgroup()
    if not parent.is_dir():
        raise PlaceError(f"{parent} (this process's memory cgroup) is not mounted here")
    child = parent / f"edgeftl-{uuid.uuid4().hex[:8]}"
    limit = str(limit_mib << 20)
    try:
        if version == 2 and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            (parent / "cgroup.subtree_control").write_text("+memory")
        child.mkdir()
        files = (["memory.max", "memory.swap.max"] if version == 2
                 else ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"])
        (child / files[0]).write_text(limit)
        if (child / files[1]).exists():
            (child / files[1]).write_text("0" if version == 2 else limit)
    except OSError as exc:
        remove_cgroup(child)
        raise PlaceError(f"cannot make a memory cgroup under {parent} (cgroup v{version}): {exc}") from exc
    return child


def remove_cgroup(child: Path) -> None:
    """Kill what still runs in the cgroup, then remove it."""
    if not child.is_dir():
        return
    deadline = time.monotonic() + 10
    while True:
        pids = [int(p) for p in (child / "cgroup.procs").read_text().split()]
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        try:
            child.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise PlaceError(f"cannot remove cgroup {child}: {exc} (still in it: {pids})") from exc
            time.sleep(0.1)


# -- tmpfs mounts: a full disk, a read-only one ----------------------------------------------

def mount_full_tmpfs(folder: Path, size_kib: int = 2048, left_kib: int = 8) -> Path:
    """A tmpfs of size_kib on folder, filled by one file until only left_kib are free."""
    folder.mkdir(parents=True)
    _run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "edgeftl-full", str(folder)])
    st = os.statvfs(folder)
    fill = st.f_bavail * st.f_frsize - (left_kib << 10)
    with open(folder / ".filler", "wb") as out:
        out.write(b"\0" * fill)
    return folder


def mount_read_only_tmpfs(folder: Path) -> Path:
    """A small empty tmpfs mounted read-only on folder."""
    folder.mkdir(parents=True)
    _run(["mount", "-t", "tmpfs", "-o", "ro,size=64k,mode=0755", "edgeftl-ro", str(folder)])
    return folder


def unmount(folder: Path) -> None:
    """Unmount folder (lazily when something still holds it)."""
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
        _run(["umount", "-l", str(folder)])


# -- what sessions left running --------------------------------------------------------------

def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def session_processes(marks: Collection[bytes], spare: Collection[int]) -> list[int]:
    """Processes whose environment, command line or working folder holds one of marks (not those in spare).

    The marks are this session's own: its SetEnv value and its target folders' unique name, so
    only what its SSH sessions started (or what runs from its folders) matches.
    """
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in spare or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd").encode()
        except OSError:
            cwd = b""
        seen = b"\0".join([_read(f"/proc/{entry.name}/environ"), _read(f"/proc/{entry.name}/cmdline"), cwd])
        if any(mark in seen for mark in marks):
            found.append(int(entry.name))
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_session_processes(marks: Collection[bytes], spare: Collection[int]) -> list[int]:
    """SIGTERM every session process, SIGKILL those left after a grace; returns the pids met."""
    met: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        pids = session_processes(marks, spare)
        if not pids:
            break
        met.extend(p for p in pids if p not in met)
        for pid in pids:
            _signal(pid, sig)
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline and session_processes(marks, spare):
            time.sleep(0.1)
    return met
