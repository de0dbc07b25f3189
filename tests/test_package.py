"""`edgeftl package`: the archive format, its verification, the wheels per platform, and a packaged
runtime that trains under a bare system Python.

The archive-format tests write small trees of their own (fast). The tests that package the real
device runtime download the device's wheels for the platform on their first run (about 60 MB per
platform, cached in ~/.cache/edgeftl/wheels, or $EDGEFTL_WHEELS) and are marked slow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgeftl.coordinator.fleet.archive import (
    MANIFEST_NAME,
    ArchiveError,
    BundleRef,
    PackageManifest,
    WheelRef,
    open_archive,
    write_archive,
)
from edgeftl.coordinator.fleet.package import LAUNCHER, RUNTIME, UNIT, hash_tree, unit_template
from edgeftl.coordinator.fleet.platforms import PLATFORMS
from edgeftl.coordinator.fleet.wheels import RECORD, WheelError, cache_folder, device_requirements, unpack_wheel
from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.protocol.manifest import bundle_sha256

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from fixtures_build import bundle, keyword_dataset

SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # Debian's: no numpy, no onnxruntime, no torch
EM_AARCH64, EM_X86_64 = 183, 62  # ELF e_machine


def run_package(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`edgeftl package ...` in-process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _environ(env or {}):
        rc = main(["package", *args])
    return rc, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _environ(changes: dict[str, str]):
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the archive format on a small tree (fast) ------------------------------------------


def small_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "edgeftl").write_text("#!/bin/sh\necho hi\n")
    (tree / "bin" / "edgeftl").chmod(0o755)
    (tree / "bundle").mkdir()
    (tree / "bundle" / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (tree / "site" / "pkg").mkdir(parents=True)
    (tree / "site" / "pkg" / "__init__.py").write_text("X = 1\n")
    return tree


def small_manifest(tree: Path) -> PackageManifest:
    return PackageManifest(format=1, platform="linux-aarch64", python="3.11", edgeftl_version="0.1.0+gabc",
                           bundle=BundleRef("b", "0" * 64, "classify", 10), wheels=[WheelRef("w.whl", "1" * 64)],
                           files=hash_tree(tree))


def rewrite(archive: Path, out: Path, change) -> None:
    """Copy archive member by member through change(name, data) -> list of (name, data) to write."""
    with tarfile.open(archive, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()  # type: ignore[union-attr]
            for name, new in change(info.name, data):
                copy = tarfile.TarInfo(name)
                copy.size, copy.mode = len(new), info.mode
                dst.addfile(copy, io.BytesIO(new))


def test_archive_round_trip_is_deterministic_and_verified(tmp_path: Path) -> None:
    # Prepare
    tree = small_tree(tmp_path)
    manifest = small_manifest(tree)

    # Execute
    write_archive(tree, manifest, tmp_path / "a.tar.gz")
    (tree / "bundle" / "model.onnx").touch()  # a new mtime must not change the bytes
    write_archive(tree, manifest, tmp_path / "b.tar.gz")
    package = open_archive(tmp_path / "a.tar.gz")
    package.extract(tmp_path / "x")

    # Assert
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    assert package.id == manifest.id == sha256(manifest.to_json())[:16]
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted([*manifest.files, MANIFEST_NAME])
    assert {(i.mtime, i.uid, i.gid, i.uname) for i in infos} == {(0, 0, 0, "")}
    assert (tmp_path / "x" / "bin" / "edgeftl").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "x" / "site" / "pkg" / "__init__.py").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "x" / MANIFEST_NAME).read_text())["files"]["bin/edgeftl"]["mode"] == 0o755
    stream = io.BytesIO()
    assert package.write_tar(["bundle/model.onnx"], stream) == (1, 10240)
    with tarfile.open(fileobj=io.BytesIO(stream.getvalue())) as tar:
        assert tar.getnames() == ["bundle/model.onnx"]
        assert tar.extractfile("bundle/model.onnx").read() == bytes(range(256)) * 40  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["tampered", "extra", "dotdot", "missing", "symlink", "noncanonical", "duplicate"])
def test_a_bad_archive_is_refused_naming_the_member(tmp_path: Path, case: str) -> None:
    # Prepare
    tree = small_tree(tmp_path)
    write_archive(tree, small_manifest(tree), tmp_path / "good.tar.gz")
    bad = tmp_path / "bad.tar.gz"
    if case == "symlink":
        with tarfile.open(tmp_path / "good.tar.gz") as src, tarfile.open(bad, "w:gz") as dst:
            for info in src.getmembers():
                dst.addfile(info, src.extractfile(info))
            link = tarfile.TarInfo("site/evil")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            dst.addfile(link)
    else:
        change = {
            "tampered": lambda n, d: [(n, d[:-1] + b"!" if n == "bundle/model.onnx" else d)],
            "extra": lambda n, d: [(n, d)] + ([("site/pkg/extra.py", b"")] if n == "site/pkg/__init__.py" else []),
            "dotdot": lambda n, d: [(n, d)] + ([("../x", b"")] if n == "bin/edgeftl" else []),
            "missing": lambda n, d: [] if n == "site/pkg/__init__.py" else [(n, d)],
            "duplicate": lambda n, d: [(n, d)] * (2 if n == "bin/edgeftl" else 1),
            "noncanonical": lambda n, d: [(n, d.replace(b'\n "format"', b'\n  "format"') if n == MANIFEST_NAME else d)],
        }[case]
        rewrite(tmp_path / "good.tar.gz", bad, change)
    expected = {"tampered": "bundle/model.onnx has sha256", "extra": "site/pkg/extra.py is not in its manifest",
                "dotdot": "'../x' has an unsafe path", "missing": "site/pkg/__init__.py is in its manifest but not",
                "symlink": "'site/evil' is not a regular file", "noncanonical": "not in canonical form",
                "duplicate": "'bin/edgeftl' appears twice"}[case]

    # Execute
    with pytest.raises(ArchiveError) as refused:
        open_archive(bad)

    # Assert
    message = str(refused.value)
    assert "\n" not in message and str(bad) in message
    assert expected in message


def test_a_changed_member_is_caught_again_when_streamed(tmp_path: Path) -> None:
    # Prepare: open (verified), then the archive file is replaced by a tampered one
    tree = small_tree(tmp_path)
    archive = tmp_path / "a.tar.gz"
    write_archive(tree, small_manifest(tree), archive)
    package = open_archive(archive)
    rewrite(archive, tmp_path / "t.tar.gz", lambda n, d: [(n, d[:-1] + b"!" if n == "bundle/model.onnx" else d)])
    shutil.move(tmp_path / "t.tar.gz", archive)

    # Execute / Assert
    with pytest.raises(ArchiveError, match=r"bundle/model\.onnx has sha256"):
        package.write_tar(["bundle/model.onnx"], io.BytesIO())
    with pytest.raises(ArchiveError, match=r"bundle/model\.onnx has sha256"):
        package.extract(tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


# ---- wheels: unpacked as an install lays them out (fast) ---------------------------------


def make_wheel(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, (data, mode) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            wheel.writestr(info, data)
    return path


def test_a_wheel_unpacks_like_an_install(tmp_path: Path) -> None:
    # Prepare
    wheel = make_wheel(tmp_path / "demo-1.0-cp311-cp311-manylinux_2_28_aarch64.whl", {
        "demo/__init__.py": (b"", 0o644),
        "demo/_core.cpython-311-aarch64-linux-gnu.so": (b"\x7fELF", 0o644),
        "demo/tool": (b"#!/bin/sh\n", 0o755),
        "demo-1.0.dist-info/METADATA": (b"Name: demo\n", 0o644),
        "demo-1.0.data/purelib/demo_extra.py": (b"Y = 2\n", 0o644),
        "demo-1.0.data/platlib/demo_plat/x.py": (b"", 0o644),
        "demo-1.0.data/scripts/demo-cli": (b"#!python\n", 0o755),
        "demo-1.0.data/headers/demo.h": (b"", 0o644),
    })
    site = tmp_path / "site"

    # Execute
    written = unpack_wheel(wheel, site)

    # Assert
    files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert files == ["demo-1.0.dist-info/METADATA", "demo/__init__.py", "demo/_core.cpython-311-aarch64-linux-gnu.so",
                     "demo/tool", "demo_extra.py", "demo_plat/x.py"]
    assert written == 6
    modes = {f: (site / f).stat().st_mode & 0o777 for f in files}
    assert modes["demo/tool"] == modes["demo/_core.cpython-311-aarch64-linux-gnu.so"] == 0o755
    assert modes["demo/__init__.py"] == 0o644


@pytest.mark.parametrize("name", ["../evil.py", "/etc/evil", "demo/../../evil.py"])
def test_a_wheel_with_an_unsafe_member_is_refused(tmp_path: Path, name: str) -> None:
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {name: (b"x", 0o644)})
    with pytest.raises(WheelError, match="unsafe path"):
        unpack_wheel(wheel, tmp_path / "site")
    assert not (tmp_path / "evil.py").exists()


# ---- refusals, one line each --------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--platform", "linux-riscv64"], "unknown platform 'linux-riscv64'; accepted: linux-x86_64, linux-aarch64"),
    (["--platform", "linux-x86_64", "--python", "3.9"], "Python '3.9' is not supported on devices; accepted: 3.10"),
])
def test_unknown_platform_or_python_is_refused(tmp_path: Path, flags: list[str], expected: str) -> None:
    rc, out, err = run_package("--bundle", str(tmp_path), "--out", str(tmp_path / "p.tar.gz"), *flags)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "p.tar.gz").exists()


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a bundle")
    rc, _, err = run_package("--bundle", str(tmp_path), "--platform", "linux-x86_64", "--out", str(tmp_path / "p.tgz"))
    assert rc == 2
    assert err.count("\n") == 1 and "is not a bundle: manifest.json is missing" in err


def test_offline_with_an_empty_cache_is_refused_naming_every_requirement(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    rc, _, err = run_package("--bundle", str(bundle(tmp_path_factory, "bert-int8")), "--platform", "linux-aarch64",
                             "--out", str(tmp_path / "p.tgz"), "--wheels-cache", str(tmp_path / "empty"), "--offline")
    assert rc == 2 and err.count("\n") == 1
    assert "no linux-aarch64 wheel of numpy, onnxruntime, tokenizers, paho-mqtt, cryptography, tqdm" in err
    assert "in the wheel cache" in err and "run once without --offline" in err
    assert not (tmp_path / "p.tgz").exists()


@pytest.mark.slow  # asks the package index (a few seconds); nothing is cached for a refusal
def test_armv7l_is_refused_naming_onnxruntime(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    # Execute: real pip resolution against the index for 32-bit ARM
    rc, _, err = run_package("--bundle", str(bundle(tmp_path_factory, "bert-int8")), "--platform", "linux-armv7l",
                               "--out", str(tmp_path / "pi.tar.gz"), "--wheels-cache", str(tmp_path / "wheels"))

    # Assert
    assert rc == 2
    assert err.count("\n") == 1, err
    assert "no linux-armv7l wheel of" in err and "onnxruntime" in err and "for Python 3.11" in err
    assert not (tmp_path / "pi.tar.gz").exists()
    assert "onnxruntime" in (tmp_path / "wheels" / "linux-armv7l-py3.11" / "pip.log").read_text()


# ---- the real device runtime (slow: the first run downloads the platform's wheels) ---------


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory, "bert-int8")


@pytest.fixture(scope="module")
def x86_archive(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("package") / "x86.tar.gz"
    rc, stdout, err = run_package("--bundle", str(bert), "--platform", "linux-x86_64", "--out", str(out))
    assert rc == 0, err
    assert f"wrote {out}" in stdout
    return out


@pytest.mark.slow
def test_x86_package_verifies_and_is_byte_identical_when_made_again(x86_archive: Path, bert: Path,
                                                                     tmp_path: Path) -> None:
    # Execute: again, with the index unreachable (the cache's record answers, pip is not run)
    again = tmp_path / "again.tar.gz"
    rc, stdout, err = run_package("--bundle", str(bert), "--platform", "linux-x86_64", "--out", str(again),
                                  env={"PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    package = open_archive(x86_archive)
    package.extract(tmp_path / "x")

    # Assert
    assert rc == 0, err
    assert "downloaded" not in stdout and stdout.count(", cached)") >= 6
    assert again.read_bytes() == x86_archive.read_bytes()
    m = package.manifest
    assert (m.platform, m.python, m.created_by) == ("linux-x86_64", "3.11", "edgeftl package")
    assert m.bundle.sha256 == bundle_sha256(bert) and m.bundle.task == "classify" and m.bundle.trainable > 0
    for rel, entry in m.files.items():
        data = (tmp_path / "x" / rel).read_bytes()
        assert (sha256(data), len(data)) == (entry.sha256, entry.size), rel
    assert {LAUNCHER, UNIT, f"{RUNTIME}/agent.py", f"{RUNTIME}/cli/__init__.py", "bundle/manifest.json"} <= set(m.files)
    assert "site/edgeftl/__init__.py" not in m.files
    assert not any("__pycache__" in rel or rel.endswith(".pyc") for rel in m.files)
    assert {w.name.split("-")[0] for w in m.wheels} >= {"numpy", "onnxruntime", "tokenizers", "paho_mqtt",
                                                         "cryptography", "tqdm", "cffi"}
    assert all(w.name.endswith(("x86_64.whl", "-none-any.whl")) for w in m.wheels)
    assert (tmp_path / "x" / UNIT).read_text() == unit_template()


@pytest.mark.slow
def test_x86_package_trains_under_a_bare_system_python(x86_archive: Path, tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.is_file():
        pytest.skip(f"{SYSTEM_PYTHON} (a Python outside any venv) is not installed")
    # Prepare: a release reached through a symlink, as <root>/current/bin/edgeftl is on a target
    open_archive(x86_archive).extract(tmp_path / "releases" / "r1")
    (tmp_path / "current").symlink_to("releases/r1")
    data = write_csv(tmp_path / "train.csv", *keyword_dataset(24, seed=0))
    launcher = tmp_path / "current" / LAUNCHER
    bare = {"PATH": "/usr/bin:/bin"}
    assert subprocess.run(["sh", "-n", str(launcher)]).returncode == 0

    # Execute
    done = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in bare.items()), str(launcher), "device", "train",
                           "--bundle", str(tmp_path / "current" / "bundle"), "--data", str(data), "--steps", "3",
                           "--batch", "4", "--threads", "1", "--json", "--quiet"],
                          capture_output=True, text=True, timeout=600)
    probe = subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in bare.items()), f"PYTHONPATH={tmp_path / 'releases/r1/site'}",
         "PYTHONNOUSERSITE=1", "python3.11", "-c",
         "import sys, numpy, onnxruntime; print(sys.executable, numpy.__file__, onnxruntime.__file__); import torch"],
        capture_output=True, text=True)
    no_python = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in bare.items()), "EDGEFTL_PYTHON=/bin/false",
                                str(launcher), "device", "--help"], capture_output=True, text=True)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    executable, numpy_file, ort_file = probe.stdout.split()
    assert executable == str(SYSTEM_PYTHON)
    assert numpy_file.startswith(str(tmp_path / "releases/r1/site")) and ort_file.startswith(str(tmp_path))
    assert "No module named 'torch'" in probe.stderr
    assert no_python.returncode == 127
    assert no_python.stderr.strip().count("\n") == 0 and "edgeftl: no Python 3.11 on this device" in no_python.stderr


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


@pytest.fixture(scope="module")
def arm_archive(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("package") / "arm.tar.gz"
    rc, _, err = run_package("--bundle", str(bert), "--platform", "linux-aarch64", "--out", str(out))
    assert rc == 0, err
    return out


@pytest.mark.slow
def test_aarch64_package_holds_aarch64_wheels(arm_archive: Path) -> None:
    # Execute
    package = open_archive(arm_archive)

    # Assert
    assert package.manifest.platform == "linux-aarch64"
    assert all(w.name.endswith(("aarch64.whl", "-none-any.whl")) for w in package.manifest.wheels)
    assert any(w.name.startswith("onnxruntime-") and "aarch64" in w.name for w in package.manifest.wheels)
    libs = [p for p in package.manifest.files if p.startswith("site/onnxruntime/capi/onnxruntime_pybind11_state")]
    machines = [(elf_machine(reader.read()), mode) for _, _, mode, reader in package.members(libs)]
    assert machines == [(EM_AARCH64, 0o755)]


@pytest.mark.slow  # under qemu-user: about a minute
# Debian 12 as on Raspberry Pi OS bookworm; Debian 13 (Python 3.13) as Termux's `proot-distro
# install debian` gives a phone today (docs/FLASHING.md): the package for that Python trains there.
@pytest.mark.parametrize(("suite", "python"), [("bookworm", "3.11"), ("trixie", "3.13")])
def test_aarch64_package_trains_on_an_emulated_arm64_board(suite: str, python: str, arm_archive: Path, bert: Path,
                                                          tmp_path: Path) -> None:
    import emulated_root

    try:  # the root the portable-runtime tests made (cached); its own python3, not their venv
        made = emulated_root.board(suite, "arm64", device_requirements())
    except emulated_root.RootError as exc:
        pytest.skip(f"no emulated ARM64 board here: {exc}")
    if python != "3.11":
        arm_archive = tmp_path / f"arm-py{python}.tar.gz"
        rc, _, err = run_package("--bundle", str(bert), "--platform", "linux-aarch64", "--python", python,
                                 "--out", str(arm_archive))
        assert rc == 0, err
    bare = emulated_root.Board(made.root, "", made.suite, made.arch)
    guest = f"/tmp/edgeftl-package-{os.getpid()}"
    work = bare.host_path(guest)
    try:
        # Prepare
        open_archive(arm_archive).extract(work / "release")
        write_csv(work / "train.csv", *keyword_dataset(16, seed=0))

        # Execute
        done = bare.run([f"{guest}/release/{LAUNCHER}", "device", "train", "--bundle", f"{guest}/release/bundle",
                         "--data", f"{guest}/train.csv", "--steps", "2", "--batch", "4", "--threads", "1", "--json",
                         "--quiet"], capture_output=True, text=True, timeout=1200)
        bare_numpy = bare.run(["python3", "-c", "import platform; print(platform.machine()); import numpy"],
                              capture_output=True, text=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    assert bare_numpy.stdout.split() == ["aarch64"] and summary["platform_python"].startswith(python + ".")
    assert "No module named 'numpy'" in bare_numpy.stderr  # everything came from the package


@pytest.mark.slow
def test_offline_resolves_from_the_cache_alone(bert: Path, x86_archive: Path, tmp_path: Path) -> None:
    # Prepare: a copy of the filled x86 cache without its record, so pip must resolve again
    filled = cache_folder(PLATFORMS["linux-x86_64"], "3.11")
    cache = tmp_path / "wheels"
    shutil.copytree(filled, cache / filled.name, ignore=shutil.ignore_patterns(RECORD, "pip.log", ".lock"))

    # Execute: the index is unreachable; --offline takes the cache with pip --no-index --find-links
    out = tmp_path / "offline.tar.gz"
    rc, stdout, err = run_package("--bundle", str(bert), "--platform", "linux-x86_64", "--out", str(out),
                                  "--wheels-cache", str(cache), "--offline",
                                  env={"PIP_INDEX_URL": "http://127.0.0.1:9/simple"})

    # Assert
    assert rc == 0, err
    assert stdout.count("from the wheel cache, offline") >= 6
    assert "--no-index --find-links" in (cache / filled.name / "pip.log").read_text()
    assert out.read_bytes() == x86_archive.read_bytes()
