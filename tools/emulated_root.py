"""An emulated Debian board: a Debian root of another architecture (ARM64 by default), run under qemu-user.

What the ARM64 device tests run in, and what a user can run to try a device install before
flashing a board:

    python tools/emulated_root.py --suite bookworm     # prints the root and its venv, builds them once
    python tools/emulated_root.py --suite trixie -- python3 -c 'import platform; print(platform.machine())'

The root is made with Debian's `debootstrap` (minbase: Python, venv, CA certificates), and a
venv inside it gets the device's dependencies from their ARM64 wheels with the root's own pip,
as a board would. Both are cached outside any checkout (CI starts from a clean clone), in a
folder keyed by what went into it, so only the first run on a machine pays: measured here,
bookworm 136-176 s for the root and ~1 min for the venv; trixie (Python 3.13) 248-295 s and ~1 min.

Needs root (debootstrap, chroot, mounting binfmt_misc and /proc), Debian's `qemu-user-static`
and `debootstrap` (installed with apt-get when missing), and a Debian package mirror and PyPI.
Emulated matrix products run ~110-210x slower than native (MiniLM steps measured): use small models inside.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITES = {"bookworm": "3.11", "trixie": "3.13"}  # Debian suite -> its python3
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
QEMU_ARCH = {"arm64": "aarch64", "armhf": "arm", "riscv64": "riscv64", "ppc64el": "ppc64le"}
CACHE_ENV = "EDGEFTL_ROOTS"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Emulated ARMv8.2 without SVE: with qemu's default CPU, numpy's SVE matmul kernels print
# spurious warnings (FACTS). Harmless either way.
QEMU_CPU = {"arm64": "cortex-a76"}
GUEST_CACHE = "/opt/edgeftl"


class RootError(RuntimeError):
    """The emulated root cannot be made or entered here; the message says why and what to do."""


@dataclass(frozen=True)
class Board:
    """A ready emulated root with a venv holding the device's dependencies."""

    root: Path  # the root on the host
    venv: str  # the venv's path inside the root
    suite: str
    arch: str

    @property
    def python(self) -> str:
        return f"{self.venv}/bin/python"

    def host_path(self, guest: str) -> Path:
        """Where a path inside the root lies on the host."""
        return self.root / guest.lstrip("/")

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None,
            **popen: object) -> subprocess.CompletedProcess:
        """Run argv inside the root (its own mount namespace, with /proc), with a clean environment."""
        return subprocess.run(self.command(argv, env), timeout=timeout, **popen)  # type: ignore[arg-type]

    def command(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """The host command line that runs argv inside the root (for Popen)."""
        guest_env = {"PATH": f"{self.venv}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/root",
                     "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
                     "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if self.arch in QEMU_CPU:
            guest_env["QEMU_CPU"] = QEMU_CPU[self.arch]
        guest_env.update(env or {})
        # A private mount namespace: /proc is mounted for this command only and vanishes with it.
        # No /sys: ONNX Runtime's cpuinfo then warns that it cannot list the CPUs (harmless); given
        # the host's x86 /sys, it crashed under emulation.
        script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
        return ["unshare", "--mount", "--fork", "sh", "-c", script, str(self.root),
                "env", "-i", *(f"{k}={v}" for k, v in guest_env.items()), *argv]


def device_requirements() -> list[str]:
    """What a device needs: the base install's requirements in pyproject.toml (the list `edgeftl package` takes)."""
    from edgeftl.coordinator.fleet.wheels import device_requirements as requirements

    return requirements()


def default_cache() -> Path:
    """$EDGEFTL_ROOTS, else ~/.cache/edgeftl/roots (outside the checkout, shared by every clone)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeftl" / "roots")


def board(suite: str = "bookworm", arch: str = "arm64", requirements: Sequence[str] = (),
          cache: Path | None = None, log=print) -> Board:
    """The emulated root for (suite, arch) with a venv holding `requirements`, made once and cached.

    Raises:
        RootError: not root, no binfmt_misc, no mirror, or a step failed (with its output).
    """
    if suite not in SUITES:
        raise RootError(f"unknown Debian suite {suite!r}; accepted: {', '.join(SUITES)}")
    if arch not in QEMU_ARCH:
        raise RootError(f"unknown architecture {arch!r}; accepted: {', '.join(QEMU_ARCH)}")
    if os.geteuid() != 0:
        raise RootError("an emulated root needs root (debootstrap, chroot, binfmt_misc); run as root")
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    _ensure_host_tools(log)
    _ensure_binfmt(arch)
    key = cache_key({"suite": suite, "arch": arch, "packages": DEBIAN_PACKAGES})
    root = cache / f"debian-{suite}-{arch}-{key}"
    with _locked(cache / f".{root.name}.lock"):
        if not (root / ".edgeftl-complete").is_file():
            _debootstrap(suite, arch, root, log)
    made = Board(root, "", suite, arch)
    venv = f"{GUEST_CACHE}/venv-{cache_key({'requirements': sorted(requirements)})}"
    with _locked(cache / f".{root.name}.venv.lock"):
        if not made.host_path(f"{venv}/.edgeftl-complete").is_file():
            log(f"making a venv in the {suite} {arch} root with {', '.join(requirements) or 'nothing'} "
                "(first run, about a minute under emulation)")
            shutil.rmtree(made.host_path(venv), ignore_errors=True)
            make_venv(lambda argv: made.run(argv, capture_output=True, text=True), "python3", venv,
                      made.host_path(f"{venv}/.edgeftl-complete"), list(requirements), log)
    return Board(root, venv, suite, arch)


def cache_key(parts: dict) -> str:
    """12 hex digits naming a cached environment by what went into it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _ensure_host_tools(log) -> None:
    missing = [pkg for pkg, binary in (("debootstrap", "debootstrap"), ("qemu-user-static", "qemu-aarch64-static"))
               if not shutil.which(binary)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise RootError(f"missing {', '.join(missing)} and no apt-get to install them; install them and retry")
    log(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update", "-q"], ["install", "-y", "-q", "--no-install-recommends", *missing]):
        done = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", *args], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RootError(f"apt-get {args[0]} failed: {done.stderr.strip()[-500:]}")


def _ensure_binfmt(arch: str) -> None:
    """Mount binfmt_misc and register qemu's interpreter for `arch` (what update-binfmts would do)."""
    if not (BINFMT / "register").exists():
        done = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RootError(f"cannot mount binfmt_misc ({done.stderr.strip()}); this machine cannot run "
                            "foreign binaries (a container without CAP_SYS_ADMIN?)")
    name = f"qemu-{QEMU_ARCH[arch]}"
    if (BINFMT / name).exists():
        return
    conf = Path(f"/usr/lib/binfmt.d/{name}.conf")
    if not conf.is_file():
        raise RootError(f"{conf} is missing; install qemu-user-static (apt-get install -y qemu-user-static)")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    try:
        (BINFMT / "register").write_text(line)
    except OSError as exc:
        if not (BINFMT / name).exists():  # a concurrent registration is fine
            raise RootError(f"cannot register {name} with binfmt_misc ({exc})") from exc


def debian_mirror() -> str:
    """The Debian mirror apt on this machine uses (deb.debian.org when none is found)."""
    for source in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = source.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def _debootstrap(suite: str, arch: str, root: Path, log) -> None:
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.making-"))
    began = time.monotonic()
    log(f"making an emulated Debian {suite} {arch} root (first run on this machine, 2-5 minutes): {root}")
    try:
        done = subprocess.run(["debootstrap", f"--arch={arch}", "--variant=minbase",
                               f"--include={','.join(DEBIAN_PACKAGES)}", suite, str(staging), debian_mirror()],
                              capture_output=True, text=True)
        if done.returncode:
            raise RootError(f"debootstrap {suite} {arch} failed: {(done.stdout + done.stderr).strip()[-800:]}")
        # pip inside the root checks certificates against the host's bundle (this machine may
        # sit behind a TLS proxy whose CA only the host's bundle carries).
        (staging / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HOST_CA, staging / "etc/ssl/certs/ca-certificates.crt")
        (staging / ".edgeftl-complete").write_text(f"{time.monotonic() - began:.0f} s\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"root ready in {time.monotonic() - began:.0f} s")


def make_venv(run, python: str, venv: str, marker: Path, requirements: list[str], log=print) -> None:
    """`python -m venv venv`, then pip installs `requirements` from wheels only; `marker` says it finished.

    `run(argv)` runs a command where the venv lives (inside a root, or on the host) and returns
    its CompletedProcess with text output.
    """
    began = time.monotonic()
    steps = [[python, "-m", "venv", venv]]
    if requirements:
        steps.append([f"{venv}/bin/python", "-m", "pip", "install", "--progress-bar", "off",
                      "--only-binary=:all:", *requirements])
    for argv in steps:
        done = run(argv)
        if done.returncode:
            raise RootError(f"{' '.join(argv[:4])} failed: {(done.stdout + done.stderr).strip()[-800:]}")
    Path(marker).write_text(f"{time.monotonic() - began:.0f} s\n")
    log(f"venv ready in {time.monotonic() - began:.0f} s")


def edgeftl_wheel(out: Path) -> Path:
    """A wheel of this checkout (pure Python, any platform), built with the host's pip."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(root)], capture_output=True, text=True)
    if done.returncode:
        raise RootError(f"pip wheel failed: {done.stderr[-2000:]}")
    return next(Path(out).glob("edgeftl-*.whl"))


def unpack(wheel: Path, python: list[str], site: str) -> None:
    """`pip install --no-deps --target site wheel`, run by the environment's own pip (`python` is its command)."""
    done = subprocess.run([*python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", site,
                           str(wheel)], capture_output=True, text=True)
    if done.returncode:
        raise RootError(f"pip install of {Path(wheel).name} failed: {done.stderr[-2000:]}")


def with_edgeftl(made: Board, wheel: Path, session: str) -> tuple[str, dict[str, str]]:
    """Unpack this checkout's wheel into /tmp/edgeftl-tests/<session>/site in the root, by the root's pip.

    Returns (the session folder inside the root, the environment that puts edgeftl on the path).
    The cached venv itself never holds edgeftl, so it never holds a stale one.
    """
    guest = f"/tmp/edgeftl-tests/{session}"
    made.host_path(guest).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheel, made.host_path(f"{guest}/{Path(wheel).name}"))
    unpack(Path(f"{guest}/{Path(wheel).name}"), made.command([made.python]), f"{guest}/site")
    return guest, {"PYTHONPATH": f"{guest}/site"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="bookworm", choices=sorted(SUITES))
    parser.add_argument("--arch", default="arm64", choices=sorted(QEMU_ARCH))
    parser.add_argument("--requirement", "-r", action="append", default=[],
                        help="a pip requirement for the root's venv (repeatable)")
    parser.add_argument("command", nargs="*", help="run this inside the root (after --)")
    args = parser.parse_args(argv)
    try:
        made = board(args.suite, args.arch, args.requirement,
                     log=lambda m: print(f"emulated_root: {m}", file=sys.stderr))
    except RootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.command:
        print(json.dumps({"root": str(made.root), "venv": made.venv, "python": made.python}))
        return 0
    return made.run(args.command).returncode


if __name__ == "__main__":
    sys.exit(main())
