"""The target-side installer, run exactly as `edgeftl flash` runs it: `sh -c` of the shlex-joined
`boot_argv` (what ssh hands the remote shell) with Debian's /usr/bin/python3.11 (no numpy, no
edgeftl installed), the script and payload on stdin, on temporary roots. The service tests use
a stand-in agent (a tiny sh script as the release's bin/edgeftl) and the real supervisor."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeftl.device import installer
from edgeftl.device.service import render_unit
from edgeftl.device.supervise import RotatingLog, backoff_delays

TARGET_PYTHON = "/usr/bin/python3.11"
pytestmark = pytest.mark.skipif(not Path(TARGET_PYTHON).exists(), reason="needs Debian's /usr/bin/python3.11")
MODES = {"bin/edgeftl": 0o755}


def call(command: str, args: dict, payload: bytes = b"", secret: bool = False) -> dict:
    """One installer command through BOOT, as flash sends it over ssh; returns its one JSON line."""
    script = installer.source()
    argv = installer.boot_argv(TARGET_PYTHON, script, command, args, secret)
    done = subprocess.run(["sh", "-c", shlex.join(argv)], input=installer.boot_stdin(script, args, secret) + payload,
                          capture_output=True, timeout=120, env={"PATH": os.environ["PATH"]})
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and len(lines) == 1, (done.returncode, done.stdout, done.stderr)
    return dict(json.loads(lines[0]))


def manifest_of(files: dict[str, bytes]) -> dict:
    return {"format": 1, "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                          "mode": MODES.get(name, 0o644)} for name, data in files.items()}}


def tar_of(files: dict[str, bytes], names: list[str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for name in names if names is not None else sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), MODES.get(name, 0o644)
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def receive(root: Path, files: dict[str, bytes], send: list[str] | None = None, reuse: str | None = None) -> dict:
    manifest = manifest_of(files)
    return call("receive", {"root": str(root), "manifest": manifest, "id": installer.manifest_id(manifest),
                            "reuse_from": reuse}, tar_of(files, send))


def runtime_files(version: str, agent: str = "exec sleep 300") -> dict[str, bytes]:
    """A release: bin/edgeftl runs the real supervisor for `device supervise`, else stands in for the agent."""
    launcher = ("#!/bin/sh\n"
                "if [ \"$1\" = device ] && [ \"$2\" = supervise ]; then\n"
                f"  exec env PYTHONPATH={shlex.quote(str(SITE))} PYTHONNOUSERSITE=1 {TARGET_PYTHON} "
                "-m edgeftl.device.cli \"$@\"\nfi\n"
                f"echo \"stand-in agent {version}: $*\"\n{agent}\n")
    return {"bin/edgeftl": launcher.encode(), "site/lib/common.py": b"x = 1\n" * 500,
            "site/lib/version.py": f"VERSION = {version!r}\n".encode(), "bundle/model.bin": os.urandom(2048)}


SITE = Path("/nonexistent")  # set by package_site


@pytest.fixture(scope="module", autouse=True)
def package_site(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A site folder where `edgeftl.device` is this checkout's device/ (the namespace `edgeftl` has no __init__),
    so the stand-in launcher runs the real supervisor with the target's python."""
    global SITE
    SITE = tmp_path_factory.mktemp("site")
    (SITE / "edgeftl").mkdir()
    (SITE / "edgeftl" / "device").symlink_to(Path(installer.__file__).resolve().parent)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A target root; whatever service runs there is stopped (and killed) at the end."""
    target = tmp_path / "target"
    yield target
    status = installer.read_json(target / "run" / "status.json") or {}
    call("stop", {"root": str(target)})
    for pid in (status.get("pid"), status.get("child_pid")):
        if installer.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def left_over(root: Path) -> list[str]:
    releases = root / "releases"
    return sorted(p.name for p in releases.iterdir() if p.name.startswith(".")) if releases.exists() else []


# ---------------------------------------------------------------- probe and its parsers


def test_probe_reports_the_target_and_leaves_nothing(root: Path) -> None:
    probe = call("probe", {"root": str(root)})
    assert probe["ok"] and probe["machine"] == platform.machine() and probe["python"].startswith("3.11.")
    assert probe["mem_total_mib"] > 0 and 0 < probe["free_mib"] <= probe["mem_available_mib"]
    assert probe["disk_free_mib"] > 0 and probe["writable"] is True and probe["writable_error"] is None
    assert probe["current"] is None and probe["service"]["running"] is False
    assert probe["user"]["uid"] == os.geteuid()
    assert not root.exists()  # the write test removed what it made


def test_long_arguments_travel_on_stdin(root: Path) -> None:
    args = {"root": str(root), "padding": "x" * (installer.MAX_INLINE_ARGS + 1)}
    assert installer.boot_argv(TARGET_PYTHON, b"", "probe", args)[-1] == installer.ARGS_FROM_STDIN
    assert call("probe", args)["ok"]


def test_meminfo_parser() -> None:
    text = "MemTotal:        3884088 kB\nMemFree:          123456 kB\nMemAvailable:    2097152 kB\n"
    assert installer.parse_meminfo(text) == {"mem_total_mib": 3793, "mem_available_mib": 2048}
    old_kernel = "MemTotal: 1048576 kB\nMemFree: 102400 kB\nBuffers: 1024 kB\nCached: 101376 kB\n"
    assert installer.parse_meminfo(old_kernel)["mem_available_mib"] == 200


def test_cgroup_v2_and_v1_limits() -> None:
    v2_mounts = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    dirs = installer.cgroup_memory_dirs("0::/system.slice/edgeftl.service\n", v2_mounts)
    assert dirs == [Path("/sys/fs/cgroup/system.slice/edgeftl.service"), Path("/sys/fs/cgroup/system.slice"),
                    Path("/sys/fs/cgroup")]
    v1_mounts = ("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                 "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    dirs = installer.cgroup_memory_dirs("4:memory:/docker/abc\n0::/\n", v1_mounts)
    assert dirs[0] == Path("/sys/fs/cgroup/memory/docker/abc") and dirs[-1] == Path("/sys/fs/cgroup/memory")
    mib = 1024 * 1024
    v2 = installer.cgroup_level(f"{1024 * mib}\n", f"{600 * mib}\n", f"anon 1\ninactive_file {100 * mib}\n")
    assert v2 == (1024 * mib, 500 * mib)
    assert installer.cgroup_level("max\n", "12345\n", "") is None
    assert installer.cgroup_level("9223372036854771712\n", "481538048\n", "total_inactive_file 1\n") is None
    v1 = installer.cgroup_level(f"{512 * mib}", f"{300 * mib}", f"inactive_file 1\ntotal_inactive_file {44 * mib}")
    assert v1 == (512 * mib, 256 * mib)
    # with the cache counters: cache no process maps (and not shmem) is reclaimable, mapped cache is not
    v1 = installer.cgroup_level(f"{160 * mib}", f"{150 * mib}", f"total_cache {120 * mib}\ntotal_mapped_file "
                                f"{30 * mib}\ntotal_shmem {10 * mib}\ntotal_inactive_file {5 * mib}\n")
    assert v1 == (160 * mib, 70 * mib)  # 150 used - (120 - 30 - 10) reclaimable
    v2 = installer.cgroup_level(f"{160 * mib}\n", f"{150 * mib}\n", f"anon {40 * mib}\nfile {100 * mib}\n"
                                f"file_mapped {20 * mib}\nshmem 0\ninactive_file {10 * mib}\n")
    assert v2 == (160 * mib, 70 * mib)
    # the level with the least room wins: 2 GiB with 1.9 used beats an inner 1 GiB with 0.5 used
    assert installer.cgroup_free([None, (1024 * mib, 512 * mib), (2048 * mib, 1946 * mib)]) == (2048, 102)
    assert installer.cgroup_free([None, None]) == (None, None)


# ---------------------------------------------------------------- receive and verify


def test_receive_all_then_only_changes_with_hard_links(root: Path) -> None:
    first = runtime_files("1")
    done = receive(root, first)
    assert done["ok"] and done["copied_files"] == 4 and done["linked_files"] == 0 and done["verified_files"] == 4
    assert call("verify", {"root": str(root), "id": done["id"]}) == {"ok": True, "id": done["id"], "files": 4}
    assert (root / "releases" / done["id"] / "bin/edgeftl").stat().st_mode & 0o777 == 0o755

    second = {**first, "site/lib/version.py": b"VERSION = '2'\n"}
    again = receive(root, second, send=["site/lib/version.py"], reuse=done["id"])
    assert again["ok"] and again["copied_files"] == 1 and again["linked_files"] == 3, again
    assert again["copied_bytes"] == len(second["site/lib/version.py"])
    assert (root / "releases" / again["id"] / "bundle/model.bin").stat().st_nlink == 2
    assert call("verify", {"root": str(root), "id": again["id"]})["ok"] and left_over(root) == []


def test_nothing_sent_when_every_file_is_reused(root: Path) -> None:
    files = runtime_files("1")
    first = receive(root, files)
    manifest = {**manifest_of(files), "format": 1, "created_by": "a re-package with the same files"}
    done = call("receive", {"root": str(root), "manifest": manifest, "reuse_from": first["id"]}, b"")
    assert done["ok"] and done["id"] == installer.manifest_id(manifest) != first["id"]
    assert (done["copied_files"], done["linked_files"], done["verified_files"]) == (0, 4, 4)


def test_damaged_member_is_refused_and_nothing_is_left(root: Path) -> None:
    good = receive(root, runtime_files("1"))
    files = runtime_files("2")
    manifest = manifest_of(files)
    files["bundle/model.bin"] = bytes(reversed(files["bundle/model.bin"]))  # same size, other bytes
    done = call("receive", {"root": str(root), "manifest": manifest, "reuse_from": good["id"]}, tar_of(files))
    assert not done["ok"] and "bundle/model.bin" in done["error"] and "sha256" in done["error"]
    assert left_over(root) == [] and sorted(p.name for p in (root / "releases").iterdir()) == [good["id"]]
    assert call("verify", {"root": str(root), "id": good["id"]})["ok"]


@pytest.mark.parametrize("name,why", [("extra.py", "not in the package manifest"), ("../x", "only relative paths"),
                                      ("/etc/x", "only relative paths")])
def test_members_outside_the_manifest_are_refused(root: Path, name: str, why: str) -> None:
    files = runtime_files("1")
    stream = tar_of({**files, name: b"evil"})
    done = call("receive", {"root": str(root), "manifest": manifest_of(files), "reuse_from": None}, stream)
    assert not done["ok"] and why in done["error"], done
    assert left_over(root) == [] and not Path("/etc/x").exists()


def test_a_link_member_is_refused(root: Path) -> None:
    files = runtime_files("1")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        info = tarfile.TarInfo("bin/edgeftl")
        info.type, info.linkname = tarfile.SYMTYPE, "/bin/sh"
        tar.addfile(info)
    done = call("receive", {"root": str(root), "manifest": manifest_of(files), "reuse_from": None}, out.getvalue())
    assert not done["ok"] and "a link or device" in done["error"] and left_over(root) == []


def test_a_tampered_installed_file_fails_verify(root: Path) -> None:
    done = receive(root, runtime_files("1"))
    (root / "releases" / done["id"] / "site/lib/version.py").write_text("VERSION = 'x'\n")
    checked = call("verify", {"root": str(root), "id": done["id"]})
    assert not checked["ok"] and "site/lib/version.py" in checked["error"]


# ---------------------------------------------------------------- unwritable and full targets


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_root_is_one_clear_line(tmpfs) -> None:  # type: ignore[no-untyped-def]
    root = tmpfs("ro,size=1m") / "edgeftl"
    probe = call("probe", {"root": str(root)})
    assert probe["ok"] and probe["writable"] is False
    assert probe["writable_error"].startswith(f"cannot write to {root} on the target: Read-only file system")
    done = receive(root, runtime_files("1"))
    assert done == {"ok": False, "error": f"cannot write to {root} on the target: Read-only file system; "
                                          "pick a writable path or fix its permissions"}


def test_full_disk_is_one_clear_line_and_leaves_nothing(tmpfs) -> None:  # type: ignore[no-untyped-def]
    root = tmpfs("size=1m") / "edgeftl"
    files = {**runtime_files("1"), "bundle/model.onnx": os.urandom(4 * 1024 * 1024)}
    done = receive(root, files)
    assert not done["ok"] and done["error"].startswith(f"target disk full at {root}: needs about ")
    assert "MiB more than the" in done["error"] and "\n" not in done["error"]
    assert left_over(root) == [] and list((root / "releases").iterdir()) == []


# ---------------------------------------------------------------- configure, activate, stop


def configured(root: Path) -> None:
    args = {"root": str(root), "agent": {"argv": ["--id", "dev1"], "env": {"EDGEFTL_X": "1"}},
            "files": {"password": base64.b64encode(b"s3cret\n").decode()}}
    # credentials never ride on a command line (readable by every local user): the args go on stdin
    assert installer.boot_argv(TARGET_PYTHON, b"", "configure", args, secret=True)[-1] == installer.ARGS_FROM_STDIN
    done = call("configure", args, secret=True)
    assert done == {"ok": True, "files": ["password"]}
    assert (root / "config/password").read_bytes() == b"s3cret\n"
    assert (root / "config/password").stat().st_mode & 0o777 == 0o600
    assert json.loads((root / "config/agent.json").read_text())["argv"] == ["--id", "dev1"]


def test_configure_refuses_a_path_as_file_name(root: Path) -> None:
    done = call("configure", {"root": str(root), "agent": {"argv": []}, "files": {"../x": ""}})
    assert not done["ok"] and "refused config file name '../x'" in done["error"]


def activate(root: Path, release: str, settle_s: float = 2.0) -> dict:
    return call("activate", {"root": str(root), "id": release, "service": "supervised", "settle_s": settle_s})


def test_activate_runs_the_agent_and_stop_ends_it(root: Path) -> None:
    configured(root)
    release = receive(root, runtime_files("1"))["id"]
    done = activate(root, release)
    assert done["ok"] and done["service"]["kind"] == "supervised" and done["service"]["running"], done
    child = done["service"]["child_pid"]
    assert installer.pid_alive(child) and os.readlink(root / "current") == f"releases/{release}"
    assert any("stand-in agent 1: device run --id dev1" in line for line in done["log_tail"])
    assert call("status", {"root": str(root)})["service"]["running"]
    stopped = call("stop", {"root": str(root)})
    assert stopped["stopped"] and not stopped["service"]["running"] and not installer.pid_alive(child)


def test_an_agent_dying_at_start_rolls_back(root: Path) -> None:
    configured(root)
    good = receive(root, runtime_files("1"))["id"]
    assert activate(root, good)["ok"]
    bad = receive(root, runtime_files("2", agent="echo 'cannot reach the broker' >&2; exit 3"), reuse=good)["id"]
    done = activate(root, bad)
    assert not done["ok"] and done["error"] == (f"agent exited with code 3 at start: cannot reach the broker; "
                                                f"rolled back to {good}")
    assert os.readlink(root / "current") == f"releases/{good}"
    status = call("status", {"root": str(root)})
    assert status["id"] == good and status["service"]["running"] and installer.pid_alive(status["service"]["child_pid"])


def test_an_agent_finishing_with_0_ends_the_supervisor(root: Path) -> None:
    configured(root)
    release = receive(root, runtime_files("1", agent="echo 'rounds done'; exit 0"))["id"]
    done = activate(root, release)
    assert done["ok"] and not done["service"]["running"] and done["service"]["last_exit"] == 0, done
    status = json.loads((root / "run/status.json").read_text())
    assert status["state"] == "exited" and status["restarts"] == 0 and status["last_line"] == "rounds done"


def test_supervisor_restarts_a_failing_agent_with_backoff(root: Path, tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    flaky = (f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}\n"
             "if [ \"$n\" -lt 2 ]; then echo \"failing start $n\"; exit 1; fi\nexec sleep 300")
    configured(root)
    release = receive(root, runtime_files("1", agent=flaky))["id"]
    (root / "current").symlink_to(f"releases/{release}")
    launcher = str(root / "current/bin/edgeftl")
    started = subprocess.run([launcher, "device", "supervise", "--root", str(root)], capture_output=True, timeout=60)
    assert started.returncode == 0 and b"running for" in started.stdout, started
    deadline = time.monotonic() + 30  # backoff 1 s + 2 s, then the third start sleeps
    status: dict = {}
    while time.monotonic() < deadline and (status.get("restarts") != 2 or status.get("state") != "running"):
        time.sleep(0.2)
        status = installer.read_json(root / "run/status.json") or {}
    assert status["restarts"] == 2 and status["last_exit"] == 1 and status["state"] == "running", status
    log = (root / "log/agent.log").read_text()
    assert "restart 1 in 1 s" in log and "restart 2 in 2 s" in log
    assert backoff_delays() == [1, 2, 4, 8, 16, 32, 60]


def test_log_rotates_keeping_one_old_file(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "agent.log", redirect_stdio=False, limit=100)
    for index in range(5):
        log.write(f"line {index} ".encode() * 4 + b"\n")  # 33 bytes: three fit under 100
    assert (tmp_path / "agent.log.1").read_text().count("\n") == 3
    assert (tmp_path / "agent.log").read_text().startswith("line 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.log", "agent.log.1"]


def test_unit_runs_the_supervisor_in_the_foreground() -> None:
    unit = render_unit("/opt/edgeftl", "edgeftl-device")
    assert "ExecStart=/opt/edgeftl/current/bin/edgeftl device supervise --root /opt/edgeftl --foreground" in unit
    assert "Restart=on-failure" in unit and "WorkingDirectory=/opt/edgeftl" in unit
    assert 'ExecStart="/srv/my edge/current/bin/edgeftl"' in render_unit("/srv/my edge")
    with pytest.raises(ValueError, match="absolute path"):
        render_unit("edgeftl")


@pytest.mark.parametrize("root", ["plain", "with space", "per%cent"])
def test_systemd_accepts_the_unit(tmp_path: Path, root: str) -> None:
    # Prepare: an installed-looking root (systemd checks that ExecStart's program is executable)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    folder = tmp_path / root
    launcher = folder / "current/bin/edgeftl"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\nexit 0\n")
    launcher.chmod(0o755)
    unit = tmp_path / "edgeftl-test.service"
    unit.write_text(render_unit(str(folder), "edgeftl-test"))

    # Execute: systemd's own parser (it exits 0 even on a setting it ignores, so stderr is the verdict)
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)

    # Assert
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    broken = unit.read_text().replace("Restart=on-failure", "Restart=sometimes")
    unit.write_text(broken)
    assert "sometimes" in subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                                         text=True).stderr  # the check would see a bad unit
