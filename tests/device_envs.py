"""Device environments besides the host venv: other Pythons and onnxruntime builds, emulated ARM64 boards.

Each holds the device's dependencies from their own wheels (for an ARM64 board: installed by
the board's own pip, under qemu) and edgeftl from a wheel built from this checkout, unpacked
into a folder of the test session, so the cached environments never hold a stale edgeftl.

    native_env("3.10", wheel)        a venv of ~/.pyenv's (or PATH's) python3.10: onnxruntime 1.23.2
    native_env("3.12", wheel)        the same with python3.12: onnxruntime 1.32
    board_env("bookworm", wheel)     Debian 12 ARM64, Python 3.11, onnxruntime from its aarch64 wheel
    board_env("trixie", wheel)       Debian 13 ARM64, Python 3.13

Environments are cached under ~/.cache/edgeftl (venvs/, roots/) keyed by the device's
requirements, so only the first run on a machine pays (boards: 3-5 minutes each, measured).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import emulated_root

device_requirements = emulated_root.device_requirements


edgeftl_wheel = emulated_root.edgeftl_wheel


@dataclass
class DeviceEnv:
    """Somewhere to run device code: a Python, its environment variables, and where files must go to be seen."""

    name: str
    python: str  # the interpreter, as the environment sees it
    env: dict[str, str] = field(default_factory=dict)  # variables set inside it
    board: emulated_root.Board | None = None
    work: Path | None = None  # on the host: a folder the environment sees (inside the root for boards)

    def command(self, argv: Sequence[str]) -> list[str]:
        if self.board is not None:
            return self.board.command(list(argv), self.env)
        return ["env", *(f"{k}={v}" for k, v in self.env.items()), *argv]

    def run(self, argv: Sequence[str], timeout: float = 1800) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout)

    def share(self, path: Path) -> str:
        """`path` as the environment can open it (copied into a board's root)."""
        if self.board is None:
            return str(path)
        target = self.work / uuid.uuid4().hex[:8] / path.name
        target.parent.mkdir(parents=True)
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, target)
        return "/" + str(target.relative_to(self.board.root))

    def host(self, guest: str) -> Path:
        """A path the environment wrote, as the host sees it."""
        return self.board.host_path(guest) if self.board is not None else Path(guest)

    def edgeftl(self, *args: str) -> list[str]:
        return [self.python, "-m", "edgeftl.device.cli", *args]


def find_python(version: str) -> str | None:
    """pyenv's newest {version}.x, else python{version} on PATH; the first that runs (pyenv shims may not)."""
    candidates = [str(p) for p in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))[::-1]]
    candidates += [found for found in [shutil.which(f"python{version}")] if found]
    for candidate in candidates:
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def native_env(version: str, wheel: Path, session: Path) -> DeviceEnv:
    """A venv of Python `version` with the device requirements, and this checkout's wheel on its path."""
    interpreter = find_python(version)
    if interpreter is None:
        raise RuntimeError(f"no python{version} here (PATH or ~/.pyenv); install it to test devices on {version}")
    from edgeftl.device.cache import default_cache_dir

    requirements = device_requirements()
    venv = default_cache_dir() / "venvs" / f"py{version}-{emulated_root.cache_key({'requirements': requirements})}"
    if not (venv / ".edgeftl-complete").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        emulated_root.make_venv(lambda argv: subprocess.run(argv, capture_output=True, text=True), interpreter,
                                str(venv), venv / ".edgeftl-complete", requirements, log=lambda m: None)
    site = session / f"py{version}-site"
    emulated_root.unpack(wheel, [str(venv / "bin/python")], str(site))
    return DeviceEnv(f"x86_64-py{version}", str(venv / "bin/python"), env={"PYTHONPATH": str(site)}, work=session)


def board_env(suite: str, wheel: Path, session_id: str) -> DeviceEnv:
    """An emulated ARM64 Debian `suite` board with the device requirements and this checkout's wheel."""
    made = emulated_root.board(suite, "arm64", device_requirements(), log=lambda m: print(f"[{suite}] {m}"))
    guest, env = emulated_root.with_edgeftl(made, wheel, session_id)
    return DeviceEnv(f"arm64-{suite}", made.python, env=env, board=made, work=made.host_path(guest))


def machine_of(env: DeviceEnv) -> dict:
    """platform.machine(), the Python and onnxruntime versions as the environment reports them."""
    code = ("import json, platform, onnxruntime; print(json.dumps({'machine': platform.machine(), "
            "'python': platform.python_version(), 'onnxruntime': onnxruntime.__version__}))")
    done = env.run([env.python, "-c", code], timeout=300)
    if done.returncode:
        raise RuntimeError(f"{env.name}: {done.stderr[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
