"""What runs ON A TARGET during `edgeftl flash`: probe, receive, verify, configure, activate, stop, status.

The host sends this file's text over ssh and runs it with the target's own python (3.8 and up
for `probe`, so an old python is reported rather than crashing; 3.10-3.13 for the rest) before
anything of edgeftl is installed there. So it imports the STANDARD LIBRARY ONLY, never edgeftl,
and holds everything target-side it needs in this one file. `boot_argv` builds the remote argv:

    <python> -c BOOT <script bytes> <command> <json args | ->

BOOT reads exactly <script bytes> of this file from stdin and runs it as `__main__`; the rest of
stdin is the command's input (the tar stream of `receive`; first, one JSON line of arguments
when the argument is "-", which `boot_argv` chooses for arguments too long for one argv entry).
Every command prints ONE JSON line, `{"ok": true, ...}` or `{"ok": false, "error": "<one line>"}`,
and exits 0 (1 only on a bug). The target layout (releases/<id>, current, config/, state/, log/,
run/) and each command's arguments and answer are documented at its `cmd_*` function.

The systemd unit's text has one home, device/service.py: the host renders it and passes it to
`activate` as "unit", since this file cannot import edgeftl.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

BOOT = ('import sys,types;n=int(sys.argv[1]);d=sys.stdin.buffer.read(n);'
        'len(d)==n or sys.exit(print("{\\"ok\\": false, \\"error\\": \\"the installer script arrived truncated '
        '(%d of %d bytes): check the connection and flash again\\"}"%(len(d),n)));'
        'm=types.ModuleType("__main__");m.__file__="<edgeftl-installer>";sys.modules["__main__"]=m;'
        'sys.argv=[m.__file__]+sys.argv[2:];exec(compile(d,m.__file__,"exec"),m.__dict__)')
ARGS_FROM_STDIN = "-"
MAX_INLINE_ARGS = 32 * 1024  # Linux refuses one argv string over 128 KiB; a big manifest goes on stdin
MANIFEST_NAME = "edgeftl-package.json"
RELEASE_ID = re.compile(r"^[0-9a-f]{16,64}$")
CONFIG_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
UNIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,99}$")
SETTLE_S = 8.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 20
MIB = 1024 * 1024
CHUNK = 1024 * 1024


class InstallError(Exception):
    """A refusal or failure with one line for the flash table, and any data the host can act on."""

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.data = data


# ---------------------------------------------------------------- host side: building the call


def _args_inline(args: dict, secret: bool) -> str | None:
    text = json.dumps(args, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= MAX_INLINE_ARGS and not secret else None


def boot_argv(python: str, script: bytes, command: str, args: dict, secret: bool = False) -> list[str]:
    """The remote argv that runs `command` with this installer; the caller shlex-joins it for ssh.

    Its stdin must start with `boot_stdin(script, args, secret)`, then the command's own input.
    `secret` args (credentials) always travel on stdin: a command line is readable by every local
    user, on both ends.
    """
    return [python, "-c", BOOT, str(len(script)), command, _args_inline(args, secret) or ARGS_FROM_STDIN]


def boot_stdin(script: bytes, args: dict, secret: bool = False) -> bytes:
    """What the remote stdin starts with: the script, then the arguments when secret or too long for argv."""
    if _args_inline(args, secret) is not None:
        return script
    return script + json.dumps(args, sort_keys=True).encode() + b"\n"


def source() -> bytes:
    """This file's own text: the script the host sends."""
    return Path(__file__).read_bytes()


# ---------------------------------------------------------------- target side: entry point


def main(argv: list[str], stdin: IO[bytes], stdout: IO[str]) -> int:
    """Run one command (argv = [command, json args or "-"]) and print its one JSON line."""
    root = "?"
    code = 0
    try:
        if len(argv) != 2 or argv[0] not in COMMANDS:
            raise InstallError(f"usage: <command> <json args>, command one of {', '.join(COMMANDS)}; got {argv!r}")
        args = _read_args(argv[1], stdin)
        root = str(args.get("root", "?"))
        result = {"ok": True, **COMMANDS[argv[0]](args, stdin)}
    except InstallError as exc:
        result = {**exc.data, "ok": False, "error": str(exc)}
    except OSError as exc:
        result = {"ok": False, "error": os_error_line(exc, root)}
    except Exception as exc:  # a bug: still one line for the table, and a traceback on stderr
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"installer bug: {type(exc).__name__}: {exc}"}
        code = 1
    stdout.write(json.dumps(result, sort_keys=True) + "\n")
    stdout.flush()
    return code


def _read_args(raw: str, stdin: IO[bytes]) -> dict:
    text = stdin.readline().decode("utf-8") if raw == ARGS_FROM_STDIN else raw
    try:
        args = json.loads(text)
    except ValueError as exc:
        raise InstallError(f"the command's arguments are not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise InstallError(f"the command's arguments must be a JSON object, got {type(args).__name__}")
    return args


def os_error_line(exc: OSError, root: str) -> str:
    """One line for an OSError, naming the root and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {root} on the target: {reason}; pick a writable path or fix its permissions"
    if exc.errno == errno.ENOSPC:
        return f"target disk full at {root}: {reason}; free some space or pick another path"
    if exc.errno == errno.ENOTDIR:
        return f"cannot use {root} on the target: part of it is a file, not a folder; pick another path"
    return f"{reason}: {exc.filename or root}"


def root_of(args: dict) -> Path:
    raw = args.get("root")
    if not isinstance(raw, str) or not raw:
        raise InstallError(f"'root' must be a path on the target, got {raw!r}")
    root = Path(os.path.expanduser(raw))
    if not root.is_absolute():
        raise InstallError(f"root {raw!r} must be an absolute path (or start with ~/)")
    return root


def release_id_of(args: dict, key: str = "id") -> str:
    value = args.get(key)
    if not isinstance(value, str) or not RELEASE_ID.match(value):
        raise InstallError(f"{key!r} must be a package id (16-64 lowercase hex digits), got {value!r}")
    return value


# ---------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write beside `path` and rename over it (device/files.py is the home; this file cannot import it)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def disk_free_mib(path: Path) -> int:
    """Free MiB for this user on the file system of `path` or its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // MIB


def log_tail(root: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    log = root / "log" / "agent.log"
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


# ---------------------------------------------------------------- releases


def manifest_files(manifest: Any) -> dict[str, dict]:
    """The manifest's {relpath: {sha256, size, mode}}, each path and entry checked."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise InstallError("the package manifest has no 'files': run edgeftl package again")
    for name, entry in files.items():
        safe_relpath(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise InstallError(f"the package manifest's entry for {name} lacks sha256/size: run edgeftl package again")
        entry_mode(name, entry)
    return files


def entry_mode(name: str, entry: dict) -> int:
    mode = entry.get("mode", 0o644)
    mode = int(mode, 8) if isinstance(mode, str) else mode
    if mode not in (0o644, 0o755):
        raise InstallError(f"the package manifest gives {name} mode {mode!r}; only 0644 and 0755 are accepted")
    return int(mode)


def safe_relpath(name: str) -> str:
    """`name` normalised ("./a/b" -> "a/b"); refused when absolute, with "..", or the manifest itself."""
    parts = [part for part in PurePosixPath(name).parts if part != "."] if isinstance(name, str) else []
    if not parts or name.startswith("/") or ".." in parts or "\\" in name or "\0" in name:
        raise InstallError(f"refused package member {name!r}: only relative paths inside the release are accepted")
    return "/".join(parts)


def canonical(manifest: dict) -> bytes:
    """The manifest's canonical bytes, as `edgeftl package` writes them (coordinator/fleet/archive.py
    PackageManifest.to_json: sorted keys, indent 1, a final newline); its id hashes them."""
    return (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode("utf-8")


def manifest_id(manifest: dict) -> str:
    """First 16 hex of the sha256 of the canonical manifest bytes."""
    return hashlib.sha256(canonical(manifest)).hexdigest()[:16]


def load_release_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InstallError(f"release {folder.name} has no readable {MANIFEST_NAME} ({exc}): flash again") from None
    manifest_files(manifest)
    return dict(manifest)


def current_id(root: Path) -> str | None:
    try:
        name = Path(os.readlink(root / "current")).name
    except OSError:
        return None
    return name if (root / "releases" / name).is_dir() else None


def check_release(folder: Path, files: dict[str, dict]) -> tuple[str | None, list[str]]:
    """(first problem or None, the names of the bad files) of `folder` against `files`; extra files are
    allowed (python writes __pycache__ beside the sources)."""
    first, bad = None, []
    for name, entry in sorted(files.items()):
        problem = file_problem(folder / name, name, entry)
        if problem:
            first = first or problem
            bad.append(name)
    return first, bad


def file_problem(path: Path, name: str, entry: dict, check_mode: bool = True) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{name} is missing"
    if not os.path.isfile(path) or os.path.islink(path):
        return f"{name} is not a regular file"
    if st.st_size != entry["size"]:
        return f"{name} has {st.st_size} bytes, its manifest says {entry['size']}"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"{name} has sha256 {digest[:12]}.., its manifest says {entry['sha256'][:12]}.."
    if check_mode and st.st_mode & 0o777 != entry_mode(name, entry):
        return f"{name} has mode {st.st_mode & 0o777:o}, its manifest says {entry_mode(name, entry):o}"
    return None


def switch_current(root: Path, release: str) -> None:
    """Point `current` at releases/<release> atomically: a symlink at a temp name renamed over it."""
    tmp = root / f".current.{secrets.token_hex(4)}"
    os.symlink(f"releases/{release}", tmp)
    try:
        os.replace(tmp, root / "current")
    finally:
        if os.path.islink(tmp):
            os.unlink(tmp)
    fsync_dir(root)


def prune_releases(root: Path, keep: set[str]) -> list[str]:
    removed = []
    for folder in sorted((root / "releases").iterdir()):
        if not folder.name.startswith(".") and folder.name not in keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


# ---------------------------------------------------------------- commands


def cmd_verify(args: dict, stdin: IO[bytes]) -> dict:
    """{"root", "id"} -> {"id", "files": n}: every file of releases/<id> against its manifest (sha256, size, mode)."""
    root, release = root_of(args), release_id_of(args)
    folder = root / "releases" / release
    if not folder.is_dir():
        raise InstallError(f"release {release} is not on the target at {folder}")
    files = manifest_files(load_release_manifest(folder))
    first, bad = check_release(folder, files)
    if first:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        # `bad` lets a flash repair the release by sending exactly those files again.
        raise InstallError(f"release {release} at {root}: {first}{more}; flash again to repair it", bad=bad)
    return {"id": release, "files": len(files)}


def cmd_configure(args: dict, stdin: IO[bytes]) -> dict:
    """{"root", "agent": {"argv", "env"}, "files": {name: base64}} -> {"files"}: config/ written 0600, atomically;
    state/ log/ run/ made."""
    root = root_of(args)
    agent = args.get("agent")
    if not (isinstance(agent, dict) and isinstance(agent.get("argv"), list)
            and all(isinstance(a, str) for a in agent["argv"])
            and isinstance(agent.get("env", {}), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in agent.get("env", {}).items())):
        raise InstallError('\'agent\' must be {"argv": [strings], "env": {name: string}}')
    files = args.get("files", {})
    if not isinstance(files, dict):
        raise InstallError("'files' must be {name: base64 content}")
    for folder in ("config", "state", "log", "run"):
        (root / folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root / "config", 0o700)
    for name, content in sorted(files.items()):
        if not (isinstance(name, str) and CONFIG_NAME.match(name)) or name == "agent.json":
            raise InstallError(f"refused config file name {name!r}: letters, digits, _ . - only (not agent.json)")
        try:
            data = base64.b64decode(content, validate=True)
        except (TypeError, ValueError):
            raise InstallError(f"config file {name}: its content is not base64") from None
        atomic_write(root / "config" / name, data)
    record = {"argv": agent["argv"], "env": agent.get("env", {})}
    atomic_write(root / "config" / "agent.json", json.dumps(record, sort_keys=True, indent=1).encode())
    return {"files": sorted(files)}


# receive, probe and the service commands are below; COMMANDS is at the end of the file.


def cmd_receive(args: dict, stdin: IO[bytes]) -> dict:
    """{"root", "manifest", "reuse_from", "id" (optional: else computed from the manifest)} + a tar stream of
    the files the target lacks (or nothing) -> {"id", copied_files, copied_bytes, linked_files, verified_files}.

    Builds releases/.<id>.partial-<rand> from the stream plus hard links into releases/<reuse_from>,
    verifies every file, then renames it to releases/<id>; on any failure the partial folder goes.
    """
    root, manifest = root_of(args), args.get("manifest")
    files = manifest_files(manifest)
    release = manifest_id(dict(manifest))  # type: ignore[arg-type]
    if "id" in args and release_id_of(args) != release:
        raise InstallError(f"release id {args['id']} does not match its manifest ({release}): the manifest changed "
                           "on the way; flash again")
    releases = root / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    reuse = reuse_index(root, args.get("reuse_from"))
    partial = releases / f".{release}.partial-{secrets.token_hex(4)}"
    partial.mkdir()
    remove_stale_partials(releases, keep=partial)
    try:
        copied, copied_bytes = extract_stream(stdin, partial, files)
        linked = link_reused(partial, files, reuse, skip=copied)
        first, bad = check_release(partial, files)
        if first:
            raise InstallError(f"received release {release}: {first}"
                               f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: the transfer was damaged; "
                               "flash again")
        atomic_write(partial / MANIFEST_NAME, canonical(dict(manifest)), 0o644)  # type: ignore[arg-type]
        fsync_tree(partial)
        publish(partial, releases / release)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            needed = sum(e["size"] for e in files.values() if e["sha256"] not in reuse) // MIB + 1
            free = disk_free_mib(root)
            raise InstallError(f"target disk full at {root}: needs about {max(1, needed - free)} MiB more than "
                               f"the {free} MiB free; free some space or pick another path") from None
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"id": release, "copied_files": len(copied), "copied_bytes": copied_bytes, "linked_files": linked,
            "verified_files": len(files)}


def reuse_index(root: Path, reuse_from: Any) -> dict[str, Path]:
    """sha256 -> a file of releases/<reuse_from> with that content (per its manifest; checked on use)."""
    if reuse_from is None:
        return {}
    folder = root / "releases" / release_id_of({"reuse_from": reuse_from}, "reuse_from")
    if not folder.is_dir():
        return {}
    try:
        files = manifest_files(load_release_manifest(folder))
    except InstallError:
        return {}  # a damaged old release is simply not reused
    return {entry["sha256"]: folder / name for name, entry in files.items()}


def remove_stale_partials(releases: Path, keep: Path) -> None:
    """Partial folders of earlier, interrupted flashes (older than this one's)."""
    started = keep.stat().st_mtime
    for folder in releases.iterdir():
        if ".partial-" in folder.name and folder != keep and folder.stat().st_mtime <= started:
            shutil.rmtree(folder, ignore_errors=True)


def extract_stream(stdin: IO[bytes], dest: Path, files: dict[str, dict]) -> tuple[set[str], int]:
    """Write each tar member into `dest`, refusing anything but listed regular files and folders.

    Returns the member paths written and their bytes. Each file is hashed as it is written.
    """
    peek = getattr(stdin, "peek", None)
    if peek is not None and not peek(1):
        return set(), 0  # nothing to send: every file is reused
    written: set[str] = set()
    total = 0
    with tarfile.open(fileobj=stdin, mode="r|*") as tar:
        for member in tar:
            name = safe_relpath(member.name)
            if member.isdir() or name == MANIFEST_NAME:
                continue  # folders are made for the files; the manifest is written from the arguments
            if not member.isreg():
                raise InstallError(f"refused package member {name}: a link or device; only regular files are accepted")
            entry = files.get(name)
            if entry is None:
                raise InstallError(f"refused package member {name}: it is not in the package manifest")
            if name in written or member.size != entry["size"]:
                raise InstallError(f"refused package member {name}: {member.size} bytes or sent twice, "
                                   f"its manifest says {entry['size']} bytes once")
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has data
            write_member(source, dest / name, name, entry)
            written.add(name)
            total += member.size
    return written, total


def write_member(source: IO[bytes], path: Path, name: str, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != entry["sha256"]:
        raise InstallError(f"received {name} with sha256 {digest.hexdigest()[:12]}.., its manifest says "
                           f"{entry['sha256'][:12]}..: the transfer was damaged; flash again")
    os.chmod(path, entry_mode(name, entry))


def link_reused(dest: Path, files: dict[str, dict], reuse: dict[str, Path], skip: set[str]) -> int:
    """Hard-link (or copy, across file systems or with another mode) each file not sent from the old release."""
    linked = 0
    for name, entry in sorted(files.items()):
        if name in skip:
            continue
        source = reuse.get(entry["sha256"])
        if source is None or not source.is_file() or source.is_symlink():
            raise InstallError(f"{name} was neither sent nor found in the previous release: flash again")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.stat().st_mode & 0o777 == entry_mode(name, entry) and try_link(source, target):
            linked += 1
            continue
        shutil.copyfile(source, target)
        os.chmod(target, entry_mode(name, entry))
        with open(target, "rb+") as handle:
            os.fsync(handle.fileno())
    return linked


def try_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    return True


def fsync_tree(folder: Path) -> None:
    for path, _dirs, _files in os.walk(folder, topdown=False):
        fsync_dir(Path(path))


def publish(partial: Path, final: Path) -> None:
    """Rename the finished partial folder to its release name, replacing an older (bad) copy."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
        os.replace(final, old)
    os.replace(partial, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- probe: memory, disk, python, service


def parse_meminfo(text: str) -> dict[str, int | None]:
    """MemTotal and MemAvailable of /proc/meminfo text, in MiB (MemAvailable estimated on kernels < 3.14)."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kib[key.strip()] = int(fields[0])
    available = kib.get("MemAvailable")
    if available is None and "MemFree" in kib:
        available = kib["MemFree"] + kib.get("Buffers", 0) + kib.get("Cached", 0)
    total = kib.get("MemTotal")
    return {"mem_total_mib": None if total is None else total // 1024,
            "mem_available_mib": None if available is None else available // 1024}


def cgroup_memory_dirs(proc_cgroup: str, mountinfo: str) -> list[Path]:
    """The memory cgroup folders of this process, innermost first up to the hierarchy's root.

    v1 (a `memory` controller line) wins over v2 (the `0::` line) on hybrid hosts, where the v1
    controller is the one that limits. Paths are taken relative to the mount's own root.
    """
    mounts: dict[str, tuple[str, str]] = {}  # "v1" / "v2" -> (mount root, mount point)
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2":
            mounts.setdefault("v2", (fields[3], fields[4]))
        elif fstype == "cgroup" and "memory" in options:
            mounts.setdefault("v1", (fields[3], fields[4]))
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            paths["v1"] = parts[2]
    for version in ("v1", "v2"):
        if version in mounts and version in paths:
            mount_root, mount_point = mounts[version]
            relative = os.path.relpath(paths[version], mount_root) if paths[version].startswith(mount_root) else "."
            folder = Path(os.path.normpath(os.path.join(mount_point, relative)))
            levels = [folder]
            while levels[-1] != Path(mount_point) and levels[-1] != levels[-1].parent:
                levels.append(levels[-1].parent)
            return levels
    return []


def cgroup_level(limit_text: str, usage_text: str, stat_text: str) -> tuple[int, int] | None:
    """(limit, usage) bytes of one cgroup level, usage less its reclaimable page cache; None when unlimited.

    v2 gives memory.max ("max" = unlimited) and memory.current; v1 memory.limit_in_bytes (a value
    near 2**63 = unlimited) and memory.usage_in_bytes. Page cache that no process maps (and that is
    not shmem) is dropped by the kernel before it kills anything, as MemAvailable counts it: without
    that, the cache of the release a flash just wrote and hashed (~200 MiB) looked like used memory.
    Where memory.stat lacks those keys, only inactive_file counts as free (what `docker stats` does).
    """
    limit_text = limit_text.strip()
    if not limit_text.isdigit() or not usage_text.strip().isdigit() or int(limit_text) >= 2**62:
        return None  # "max", a v1 value near 2**63, or unreadable: no limit here
    stat = {k: int(v) for k, v, *_ in (line.split() for line in stat_text.splitlines() if len(line.split()) >= 2)
            if v.isdigit()}
    v1 = "total_cache" in stat
    cache, mapped, shmem = ((stat.get("total_cache"), stat.get("total_mapped_file"), stat.get("total_shmem", 0)) if v1
                            else (stat.get("file"), stat.get("file_mapped"), stat.get("shmem", 0)))
    if cache is not None and mapped is not None:
        reclaimable = max(0, cache - mapped - (shmem or 0))
    else:
        reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    usage = int(usage_text.strip())
    return int(limit_text), max(0, usage - reclaimable)


def cgroup_free(levels: list[tuple[int, int] | None]) -> tuple[int | None, int | None]:
    """(limit MiB, free MiB) of the level with the least room, or (None, None) when none limits."""
    limited = [level for level in levels if level is not None]
    if not limited:
        return None, None
    limit, usage = min(limited, key=lambda level: level[0] - level[1])
    return limit // MIB, max(0, limit - usage) // MIB


def read_text(path: Path | str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def memory_probe() -> dict[str, int | None]:
    memory = parse_meminfo(read_text("/proc/meminfo"))
    levels = []
    for folder in cgroup_memory_dirs(read_text("/proc/self/cgroup"), read_text("/proc/self/mountinfo")):
        v2 = (folder / "memory.max").exists()
        names = ("memory.max", "memory.current") if v2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit, usage = read_text(folder / names[0]), read_text(folder / names[1])
        if limit.strip() and usage.strip():
            levels.append(cgroup_level(limit, usage, read_text(folder / "memory.stat")))
    limit_mib, cgroup_free_mib = cgroup_free(levels)
    frees = [value for value in (memory["mem_available_mib"], cgroup_free_mib) if value is not None]
    return {**memory, "cgroup_limit_mib": limit_mib, "cgroup_free_mib": cgroup_free_mib,
            "free_mib": min(frees) if frees else None}


def writable_probe(root: Path) -> str | None:
    """None when `root` can be made and written, else the one-line reason; leaves nothing behind."""
    made = []
    try:
        for folder in reversed([root, *root.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        probe = root / f".edgeftl-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return os_error_line(exc, str(root))
    finally:
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
    return None


def user_probe() -> dict:
    uid = os.geteuid()
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        name = os.environ.get("USER", "?")
    return {"uid": uid, "name": name}


def cmd_probe(args: dict, stdin: IO[bytes]) -> dict:
    """{"root"} -> machine, python, memory (MiB: total, available, cgroup limit/free, free = the least), disk
    free at root, writable, systemd, user, the current release's {id, files: {path: sha256}}, every complete
    release's id (a release received by a flash that did not start it is reused by the next), the service."""
    root = root_of(args)
    unwritable = writable_probe(root)
    current = current_id(root)
    current_files = None
    if current is not None:
        try:
            files = manifest_files(load_release_manifest(root / "releases" / current))
            current_files = {"id": current, "files": {name: entry["sha256"] for name, entry in files.items()}}
        except InstallError:
            current_files = None  # a damaged current release: the flash sends everything
    folder = root / "releases"
    releases = sorted(p.name for p in folder.iterdir() if p.is_dir() and RELEASE_ID.match(p.name)) \
        if folder.is_dir() else []
    return {"machine": platform.machine(), "python": platform.python_version(), **memory_probe(),
            "disk_free_mib": disk_free_mib(root), "writable": unwritable is None, "writable_error": unwritable,
            "systemd": has_systemd(), "user": user_probe(), "current": current_files, "releases": releases,
            "service": service_state(root)}


# ---------------------------------------------------------------- the service: systemd or supervised


def has_systemd() -> bool:
    """PID 1 is systemd (its runtime folder exists) and systemctl is on PATH."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def pid_alive(pid: Any) -> bool:
    """True when process `pid` exists and is not a zombie (an orphan's reaper may be slow)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    stat = read_text(f"/proc/{pid}/stat")
    if stat:
        return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supervisor_pid(root: Path) -> int | None:
    """The live supervisor's pid from run/supervisor.pid (checked against its command line), or None."""
    try:
        pid = int(read_text(root / "run" / "supervisor.pid").strip() or "0")
    except ValueError:
        return None
    cmdline = read_text(f"/proc/{pid}/cmdline") if pid > 0 else ""
    return pid if pid_alive(pid) and (not cmdline or "supervise" in cmdline) else None


def rss_mib(pid: Any) -> float | None:
    for line in read_text(f"/proc/{pid}/status").splitlines() if pid_alive(pid) else []:
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def service_state(root: Path) -> dict:
    """{kind, running, pid, child_pid, restarts, last_exit, rss_mib} of the agent service at `root`."""
    record = read_json(root / "run" / "service.json") or {}
    status = read_json(root / "run" / "status.json") or {}
    pid = supervisor_pid(root)
    child = status.get("child_pid") if pid is not None else None
    return {"kind": record.get("kind"), "unit": record.get("unit"), "running": pid is not None, "pid": pid,
            "child_pid": child, "restarts": status.get("restarts"), "last_exit": status.get("last_exit"),
            "rss_mib": rss_mib(child) if child else None}


def systemctl(user: bool, *words: str) -> None:
    argv = ["systemctl", *(["--user"] if user else []), *words]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise InstallError(f"{' '.join(argv)} failed: {reason}")


def stop_service(root: Path) -> bool:
    """Stop the agent service at `root` (systemd unit or supervisor): SIGTERM, SIGKILL after 10 s."""
    record = read_json(root / "run" / "service.json") or {}
    stopped = False
    if record.get("kind") == "systemd" and shutil.which("systemctl"):
        systemctl(bool(record.get("user")), "stop", str(record["unit"]))
        stopped = True
    pid = supervisor_pid(root)
    if pid is None:
        return stopped
    child = (read_json(root / "run" / "status.json") or {}).get("child_pid")
    os.kill(pid, signal.SIGTERM)  # the supervisor stops its agent, SIGKILLing it after 10 s
    deadline = time.monotonic() + STOP_GRACE_S + 2
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for leftover in (pid, child):
        if isinstance(leftover, int) and pid_alive(leftover):
            os.kill(leftover, signal.SIGKILL)
    return True


def choose_kind(args: dict) -> str:
    """"systemd" where PID 1 is systemd and we are root (a user unit dies at logout without lingering:
    ask for "systemd" explicitly to get one), else "supervised"."""
    wanted = args.get("service", "auto")
    if wanted not in ("auto", "systemd", "supervised"):
        raise InstallError(f"'service' must be auto, systemd or supervised, got {wanted!r}")
    if wanted == "systemd" and not has_systemd():
        raise InstallError("the target has no systemd (PID 1 is not systemd or systemctl is missing): "
                           "use --service supervised or auto")
    if wanted == "auto":
        return "systemd" if has_systemd() and os.geteuid() == 0 else "supervised"
    return str(wanted)


def start_service(root: Path, kind: str, unit: str, unit_text: Any) -> None:
    for name in ("status.json", "supervisor.pid"):
        (root / "run" / name).unlink(missing_ok=True)  # so settling reads this start's state only
    user = os.geteuid() != 0
    record = {"kind": kind, "unit": unit if kind == "systemd" else None, "user": user}
    atomic_write(root / "run" / "service.json", json.dumps(record, sort_keys=True).encode())
    if kind == "systemd":
        if not isinstance(unit_text, str) or "ExecStart=" not in unit_text:
            raise InstallError("activate with systemd needs the unit text rendered by device/service.py in 'unit'")
        folder = Path.home() / ".config/systemd/user" if user else Path("/etc/systemd/system")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{unit}.service", unit_text.encode(), 0o644)
        systemctl(user, "daemon-reload")
        systemctl(user, "enable", unit)
        systemctl(user, "restart", unit)
        return
    log = root / "log" / "agent.log"
    with open(log, "ab") as out:  # the launcher's own errors (no python) land in the log too
        done = subprocess.run([str(root / "current" / "bin" / "edgeftl"), "device", "supervise", "--root", str(root)],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60,
                              start_new_session=True)
    if done.returncode != 0:
        raise InstallError(f"the supervisor did not start (exit code {done.returncode}): "
                           f"{(log_tail(root, 1) or ['no output'])[-1]}")


def settle(root: Path, settle_s: float) -> str | None:
    """Watch the fresh service for `settle_s`: None when it runs (or the agent finished with 0), else why not."""
    deadline = time.monotonic() + settle_s
    while True:
        status = read_json(root / "run" / "status.json")
        alive = supervisor_pid(root) is not None
        if status is not None and status.get("last_exit") not in (None, 0):
            return f"agent exited with code {status['last_exit']} at start: {status.get('last_line') or 'no output'}"
        if status is not None and not alive:
            return None if status.get("last_exit") == 0 else f"the supervisor died: {(log_tail(root, 1) or ['?'])[-1]}"
        if time.monotonic() >= deadline:
            return None if alive else f"the service did not start in {settle_s:g} s: {(log_tail(root, 1) or ['?'])[-1]}"
        time.sleep(0.2)


def start_and_settle(root: Path, kind: str, unit: str, unit_text: Any, settle_s: float) -> str | None:
    try:
        start_service(root, kind, unit, unit_text)
    except InstallError as exc:
        return str(exc)
    return settle(root, settle_s)


def cmd_activate(args: dict, stdin: IO[bytes]) -> dict:
    """{"root", "id", "service": auto|systemd|supervised, "unit_name", "unit" (text, for systemd), "settle_s"}
    -> {"id", "previous", "service", "log_tail"}.

    Stops the old service, switches `current`, starts the service and watches it for settle_s; when
    the agent exits != 0 in that time, switches back to the previous release, starts it again and
    answers ok false. Keeps releases/ to current + previous.
    """
    root, release = root_of(args), release_id_of(args)
    if not (root / "releases" / release / "bin" / "edgeftl").is_file():
        raise InstallError(f"release {release} is not complete on the target at {root}: receive it first")
    if not (root / "config" / "agent.json").is_file():
        raise InstallError(f"{root}/config/agent.json is missing: configure the target first")
    kind, unit = choose_kind(args), args.get("unit_name", "edgeftl-device")
    if not (isinstance(unit, str) and UNIT_NAME.match(unit)):
        raise InstallError(f"'unit_name' must be letters, digits, _ . @ -, got {unit!r}")
    settle_s = args.get("settle_s", SETTLE_S)
    if not isinstance(settle_s, (int, float)) or not 0 <= settle_s <= 300:
        raise InstallError(f"'settle_s' must be seconds in 0..300, got {settle_s!r}")
    previous = current_id(root)
    stop_service(root)
    switch_current(root, release)
    problem = start_and_settle(root, kind, unit, args.get("unit"), settle_s)
    if problem is not None:
        stop_service(root)
        if previous is None or previous == release:
            raise InstallError(f"{problem}; no previous release to roll back to, the service is stopped")
        switch_current(root, previous)
        again = start_and_settle(root, kind, unit, args.get("unit"), settle_s)
        prune_releases(root, {previous, release})
        raise InstallError(f"{problem}; rolled back to {previous}" + (f", which failed too: {again}" if again else ""))
    prune_releases(root, {release, previous or release})
    return {"id": release, "previous": previous, "service": service_state(root), "log_tail": log_tail(root)}


def cmd_stop(args: dict, stdin: IO[bytes]) -> dict:
    """{"root"} -> {"stopped", "service"}."""
    root = root_of(args)
    return {"stopped": stop_service(root), "service": service_state(root)}


def cmd_status(args: dict, stdin: IO[bytes]) -> dict:
    """{"root"} -> {"id" (current release), "service", "log_tail"}."""
    root = root_of(args)
    return {"id": current_id(root), "service": service_state(root), "log_tail": log_tail(root)}


COMMANDS: dict[str, Callable[[dict, IO[bytes]], dict]] = {
    "probe": cmd_probe, "verify": cmd_verify, "receive": cmd_receive, "configure": cmd_configure,
    "activate": cmd_activate, "stop": cmd_stop, "status": cmd_status,
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin.buffer, sys.stdout))
