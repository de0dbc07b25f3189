"""`edgeftl package`: one self-contained archive per (bundle, platform, Python) that a board runs as is.

The archive holds the device runtime (every .py of `edgeftl.device`), the platform's wheels
unpacked into site/, the bundle, a POSIX sh launcher and a systemd unit template; its manifest
lists the sha256 of every file (archive.py). The target needs only a Python X.Y: no package
index, no compiler, no pip.

    build_package(PackageConfig(bundle, "linux-aarch64", "3.11", out)) -> PackageResult
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgeftl.coordinator.fleet.archive import (
    CREATED_BY,
    FORMAT,
    BundleRef,
    Member,
    PackageManifest,
    WheelRef,
    write_archive,
)
from edgeftl.coordinator.fleet.platforms import DEFAULT_PYTHON, check_platform, check_python
from edgeftl.coordinator.fleet.wheels import MIB, cache_folder, device_requirements, download_wheels, unpack_wheels
from edgeftl.device.protocol.manifest import MANIFEST, bundle_sha256, sha256_file, verify_bundle

RUNTIME = "site/edgeftl/device"  # where the device runtime lies in the archive
LAUNCHER = "bin/edgeftl"
UNIT = "service/edgeftl-device.service.in"
BUNDLE = "bundle"

# The launcher (flash design contract): POSIX sh, so it runs on any board before Python is found.
LAUNCHER_SH = """#!/bin/sh
# edgeftl launcher, written by `edgeftl package`: runs this release's device runtime with Python {python}.
# The release is this script's ../ with symlinks resolved, so <root>/current/bin/edgeftl works.
# Python: $EDGEFTL_PYTHON, else python{python}, else python3 when it is {python}.
want={python}
self=$0
while [ -L "$self" ]; do
    link=$(readlink "$self")
    case $link in
        /*) self=$link ;;
        *) self=$(dirname "$self")/$link ;;
    esac
done
release=$(cd "$(dirname "$self")/.." && pwd -P) || exit 127
if [ -n "${{EDGEFTL_PYTHON:-}}" ]; then
    py=$EDGEFTL_PYTHON
elif command -v "python$want" >/dev/null 2>&1; then
    py=python$want
else
    py=python3
fi
got=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
if [ "$got" != "$want" ]; then
    echo "edgeftl: no Python $want on this device ($py: ${{got:-not found}});" \
        "install python$want or set EDGEFTL_PYTHON" >&2
    exit 127
fi
PYTHONPATH=$release/site
PYTHONNOUSERSITE=1
export PYTHONPATH PYTHONNOUSERSITE
exec "$py" -m edgeftl.device.cli "$@"
"""


def unit_template() -> str:
    """The systemd unit template's text; its one home is edgeftl.device.service.UNIT_TEMPLATE."""
    from edgeftl.device.service import UNIT_TEMPLATE

    return UNIT_TEMPLATE


@dataclass(frozen=True)
class PackageConfig:
    """What `edgeftl package` builds: flags map one to one onto these fields."""

    bundle: Path
    platform: str
    out: Path
    python: str = DEFAULT_PYTHON
    wheels_cache: Path | None = None  # base folder; <platform>-py<X.Y>/ below it
    offline: bool = False

    def __post_init__(self) -> None:
        check_platform(self.platform)
        check_python(self.python)
        if not Path(self.out).parent.is_dir():
            raise ValueError(f"--out {str(self.out)!r}: folder {str(Path(self.out).parent)!r} does not exist")
        if Path(self.out).is_dir():
            raise ValueError(f"--out {str(self.out)!r} is a folder; name the archive file to write")


@dataclass(frozen=True)
class PackageResult:
    path: Path
    manifest: PackageManifest
    size_bytes: int

    def summary(self) -> str:
        m = self.manifest
        return (f"wrote {self.path}: {self.size_bytes / MIB:.1f} MiB, id {m.id}, {len(m.files) + 1} files, "
                f"{m.platform}, Python {m.python}, edgeftl {m.edgeftl_version}, bundle {m.bundle.name} "
                f"sha256 {m.bundle.sha256[:12]}..")


def build_package(config: PackageConfig, log: Callable[[str], None] = print) -> PackageResult:
    """Download, unpack, lay out, hash and write one package archive (atomically).

    Raises:
        ValueError: a bad bundle (BundleError), a platform/Python with no wheel for a
            requirement (WheelError), or an unusable tree (ArchiveError); each one line.
    """
    platform = check_platform(config.platform)
    bundle_manifest = verify_bundle(config.bundle)
    cache = cache_folder(platform, config.python, config.wheels_cache)
    log(f"wheels for {platform.name}, Python {config.python} (cache {cache}{', offline' if config.offline else ''}):")
    wheels = download_wheels(platform, config.python, device_requirements(), cache, config.offline, log)
    with tempfile.TemporaryDirectory(prefix="edgeftl-package-") as tmp:
        tree = Path(tmp)
        log(f"unpacking {len(wheels)} wheels into site/ ({sum(w.path.stat().st_size for w in wheels) / MIB:.1f} MiB)")
        unpacked = unpack_wheels(wheels, tree / "site")
        runtime = copy_runtime(tree / RUNTIME)
        bundled = copy_bundle(Path(config.bundle), tree / BUNDLE)
        _write(tree / LAUNCHER, LAUNCHER_SH.format(python=config.python), 0o755)
        _write(tree / UNIT, unit_template(), 0o644)
        log(f"hashing {unpacked + runtime + bundled + 2} files ({unpacked} from wheels, {runtime} runtime, "
            f"{bundled} bundle, launcher, unit)")
        files = hash_tree(tree)
        manifest = PackageManifest(
            format=FORMAT, platform=platform.name, python=config.python, edgeftl_version=runtime_version(files),
            bundle=BundleRef(Path(config.bundle).resolve().name, bundle_sha256(config.bundle), bundle_manifest.task,
                             bundle_manifest.trainable_count),
            wheels=[WheelRef(w.name, w.sha256) for w in wheels], files=files, created_by=CREATED_BY)
        log(f"writing {config.out}")
        write_archive(tree, manifest, Path(config.out))
    return PackageResult(Path(config.out), manifest, Path(config.out).stat().st_size)


def copy_runtime(dest: Path) -> int:
    """Every .py of the installed edgeftl.device (no __pycache__, no tests) into dest; returns how many."""
    source = Path(importlib.import_module("edgeftl.device").__file__ or "").resolve().parent
    count = 0
    for path in sorted(source.rglob("*.py")):
        rel = path.relative_to(source)
        if "__pycache__" in rel.parts or "tests" in rel.parts or rel.name.startswith("test_"):
            continue
        _copy(path, dest / rel)
        count += 1
    return count


def copy_bundle(bundle: Path, dest: Path) -> int:
    """The bundle's manifest.json and every file it lists (what bundle_sha256 vouches for)."""
    manifest = verify_bundle(bundle)
    for rel in [MANIFEST, *sorted(manifest.files)]:
        _copy(bundle / rel, dest / rel)
    return len(manifest.files) + 1


def hash_tree(tree: Path) -> dict[str, Member]:
    """sha256, size and mode (0755 when any execute bit is set, else 0644) of every file under tree.

    Raises:
        ValueError: a symbolic link or special file (a package holds regular files only).
    """
    files = {}
    for path in sorted(tree.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"{path} is a link or special file; a package holds regular files only")
        if path.is_file():
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            files[path.relative_to(tree).as_posix()] = Member(sha256_file(path), path.stat().st_size, mode)
    return files


def runtime_version(files: dict[str, Member]) -> str:
    """edgeftl's version + "+g" and 12 hex of the runtime files' combined sha256 (paths and hashes)."""
    try:
        base = version("edgeftl")
    except PackageNotFoundError:
        base = "0.0.0"
    lines = "".join(f"{path}\0{entry.sha256}\n" for path, entry in sorted(files.items())
                    if path.startswith(RUNTIME + "/"))
    local = "." if "+" in base else "+"  # one PEP 440 local part
    return f"{base}{local}g{hashlib.sha256(lines.encode()).hexdigest()[:12]}"


def _copy(source: Path, dest: Path) -> None:
    if source.is_symlink() or not source.is_file():
        raise ValueError(f"{source} is not a regular file; a package holds regular files only")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    os.chmod(dest, 0o755 if source.stat().st_mode & 0o111 else 0o644)


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
