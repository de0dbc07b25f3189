"""The device's dependencies as wheels for another platform and Python, and how they are unpacked.

`edgeftl package` downloads the device requirements (pyproject's base `dependencies`, the list a
board's `pip install edgeftl` would take) for the target's platform and Python with
`pip download --only-binary=:all: --platform ... --python-version X.Y`, one requirement at a
time so that a platform with no wheel for one of them is refused with that one named. Wheels are
cached per (platform, Python) in ~/.cache/edgeftl/wheels/<platform>-py<X.Y>/ ($EDGEFTL_WHEELS
moves the base) with a record of what each requirement resolved to, so a second package run
uses the record and never calls pip; `offline` resolves missing ones from the cache alone.

A wheel is a zip: its files go into the package's site/ folder as pip would lay them out
(`*.data/purelib` and `*.data/platlib` merged into site, `*.data/scripts|headers|data` dropped,
`*.dist-info` kept), refusing members with absolute paths or "..".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeftl.coordinator.fleet.platforms import SUPPORTED, Platform
from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.manifest import sha256_file

CACHE_ENV = "EDGEFTL_WHEELS"
RECORD = "resolved.json"  # requirement -> {wheel filename: sha256}, what it resolved to last time
PIP_LOG = "pip.log"
MIB = 1024 * 1024
_SAVED = re.compile(r"^\s*(?:Saved|File was already downloaded) (.+\.whl)\s*$", re.MULTILINE)
_NOT_FOUND = re.compile(r"No matching distribution found for ([^\s;]+)")
_UNAVAILABLE = re.compile(r"no matching distributions available for your environment:\n((?:[ \t]+\S+\n?)+)")
_OFFLINE = re.compile(r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
                      r"Max retries exceeded|Connection refused")


class WheelError(ValueError):
    """Wheels for the chosen platform cannot be had or unpacked; the message says which and why."""


@dataclass(frozen=True)
class Wheel:
    """One downloaded wheel file and its sha256."""

    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def project(self) -> str:
        return normalize(self.name.split("-")[0])

    @property
    def version(self) -> str:
        return self.name.split("-")[1]


def normalize(project: str) -> str:
    """A project's canonical name (PEP 503): `paho_mqtt` and `Paho.MQTT` are `paho-mqtt`."""
    return re.sub(r"[-_.]+", "-", project).lower()


def device_requirements() -> list[str]:
    """What a device needs: the base install's requirements in pyproject.toml (no extras)."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        return list(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"])
    from importlib.metadata import requires  # an installed (not editable) edgeftl has no pyproject

    return [r for r in requires("edgeftl") or [] if "extra ==" not in r]


def cache_folder(platform: Platform, python: str, base: Path | None = None) -> Path:
    """<base>/<platform>-py<X.Y>; base defaults to $EDGEFTL_WHEELS, else ~/.cache/edgeftl/wheels."""
    root = base or Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeftl" / "wheels")
    return Path(root) / f"{platform.name}-py{python}"


def download_wheels(platform: Platform, python: str, requirements: list[str], cache: Path, offline: bool = False,
                    log: Callable[[str], None] = print) -> list[Wheel]:
    """Every wheel the requirements need on (platform, python), from the cache or downloaded into it.

    Args:
        platform: the target platform.
        python: "X.Y".
        requirements: PEP 508 requirement strings.
        cache: this (platform, python)'s cache folder (created).
        offline: resolve what the cache record lacks with `--no-index --find-links cache`.
        log: one line per requirement.

    Returns:
        The wheels, sorted by file name, one per project.

    Raises:
        WheelError: one line naming every requirement with no wheel for the platform and Python.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        record = _read_record(cache)
        missing: list[str] = []
        for requirement in requirements:
            wheels = _cached(cache, record.get(requirement))
            source = "cached"
            if wheels is None:
                wheels, problem = _pip_download(platform, python, requirement, cache, offline)
                if wheels is None:
                    missing.append(problem)
                    continue
                source = "from the wheel cache, offline" if offline else "downloaded"
                record[requirement] = {w.name: w.sha256 for w in wheels}
            mib = sum(w.path.stat().st_size for w in wheels) / MIB
            log(f"  {requirement}: {', '.join(f'{w.project} {w.version}' for w in wheels)} ({mib:.1f} MiB, {source})")
        if missing:
            raise WheelError(_missing_message(platform, python, missing, cache, offline))
        atomic_write(cache / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n", 0o644)
    return _one_per_project([w for r in requirements for w in _cached(cache, record[r]) or []])


def _cached(cache: Path, entry: dict[str, str] | None) -> list[Wheel] | None:
    """The recorded wheels of one requirement if every file is still there with its recorded sha256."""
    if not entry:
        return None
    wheels = [Wheel(cache / name, sha) for name, sha in sorted(entry.items())]
    if all(w.path.is_file() and sha256_file(w.path) == w.sha256 for w in wheels):
        return wheels
    return None


def _pip_download(platform: Platform, python: str, requirement: str, cache: Path,
                  offline: bool) -> tuple[list[Wheel] | None, str]:
    """(the wheels pip resolved requirement to, "") or (None, what is missing)."""
    abi = "cp" + python.replace(".", "")
    argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--progress-bar", "off", "--no-input",
            "--disable-pip-version-check", *(arg for tag in platform.pip_tags for arg in ("--platform", tag)),
            "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
            "-d", str(cache), *(["--no-index", "--find-links", str(cache)] if offline else []), requirement]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    with open(cache / PIP_LOG, "a", encoding="utf-8") as handle:
        handle.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n{done.stdout}")
    if done.returncode == 0:
        names = sorted({Path(line).name for line in _SAVED.findall(done.stdout)})
        return [Wheel(cache / name, sha256_file(cache / name)) for name in names], ""
    return None, _what_is_missing(requirement, done.stdout)


def _what_is_missing(requirement: str, output: str) -> str:
    """The requirement's project, and the dependency pip found no wheel of when it is another one."""
    project = normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group())  # type: ignore[union-attr]
    if not _NOT_FOUND.search(output) and _OFFLINE.search(output):
        return f"{project} (the package index cannot be reached)"
    lacking = [normalize(re.match(r"[A-Za-z0-9._-]+", spec).group())  # type: ignore[union-attr]
               for spec in _NOT_FOUND.findall(output)]
    unavailable = _UNAVAILABLE.search(output)
    if unavailable:
        lacking += [normalize(name) for name in unavailable.group(1).split()]
    lacking = [name for name in dict.fromkeys(lacking) if name != project]
    return f"{project} (needs {', '.join(lacking)})" if lacking else project


def _missing_message(platform: Platform, python: str, missing: list[str], cache: Path, offline: bool) -> str:
    if offline:
        where, then = f"in the wheel cache {cache}", "run once without --offline to fill the cache"
    else:
        where, then = "on the package index", f"edgeftl's device runtime cannot run there (platforms with every " \
            f"wheel: {', '.join(SUPPORTED)})"
    return f"no {platform.name} wheel of {', '.join(missing)} for Python {python} {where}; {then}; pip's output: " \
        f"{cache / PIP_LOG}"


def _one_per_project(wheels: list[Wheel]) -> list[Wheel]:
    chosen: dict[str, Wheel] = {}
    for wheel in wheels:
        other = chosen.setdefault(wheel.project, wheel)
        if other.name != wheel.name:
            raise WheelError(f"the device requirements resolved to two wheels of {wheel.project} ({other.name}, "
                             f"{wheel.name}); pin it in pyproject.toml's dependencies")
    return sorted(chosen.values(), key=lambda w: w.name)


def _read_record(cache: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads((cache / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two package runs for one platform take turns on its cache (pip writes into it)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def unpack_wheels(wheels: list[Wheel], site: Path) -> int:
    """Unpack every wheel into site as an install would lay it out; returns the number of files written.

    Raises:
        WheelError: a member with an absolute path, "..", or a link, or two wheels writing one
            path with different bytes.
    """
    return sum(unpack_wheel(w.path, site) for w in wheels)


def unpack_wheel(wheel: Path, site: Path) -> int:
    """Unpack one wheel into site (see the module docstring); returns the number of files written."""
    written = 0
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            rel = _site_path(wheel, info)
            if rel is None:
                continue
            dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src:
                data = src.read()
            if dest.exists() and dest.read_bytes() != data:
                raise WheelError(f"wheel {wheel.name} and an earlier one both install {rel} with different bytes")
            dest.write_bytes(data)
            os.chmod(dest, _mode(info))
            written += 1
    return written


def _site_path(wheel: Path, info: zipfile.ZipInfo) -> str | None:
    """Where a wheel member goes under site/, or None for the parts an install drops."""
    name = info.filename
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ".." in parts or "" in parts or ":" in parts[0]:
        raise WheelError(f"wheel {wheel.name} has a member with an unsafe path {name!r}; refusing to unpack it")
    if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):  # a link or device, not a regular file
        raise WheelError(f"wheel {wheel.name} member {name!r} is not a regular file; refusing to unpack it")
    if not parts[0].endswith(".data"):
        return name
    if len(parts) >= 3 and parts[1] in ("purelib", "platlib"):
        return "/".join(parts[2:])
    return None  # scripts, headers, data: a device runs `python -m edgeftl.device.cli` and compiles nothing


def _mode(info: zipfile.ZipInfo) -> int:
    """0755 for what the wheel marks executable and for shared libraries, else 0644."""
    executable = (info.external_attr >> 16) & 0o111 or re.search(r"\.so(\.\d+)*$", info.filename)
    return 0o755 if executable else 0o644

