"""The SSH targets the flash tests push to (tests/ssh_targets.py) are what they claim to be."""

from __future__ import annotations

import dataclasses

import pytest

from ssh_targets import SshServer, ssh

pytest_plugins = ["ssh_targets"]


def test_plain_target_runs_the_host_python(ssh_server: SshServer) -> None:
    target = ssh_server.plain("plain")

    done = ssh(target, f"cd {target.path} && python3.11 -c 'print(1)' && echo made > here")

    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    assert target.host_path(f"{target.path}/here").read_text() == "made\n"
    assert target.url.startswith("ssh://") and f":{target.port}/" in target.url


def test_target_without_python(ssh_server: SshServer) -> None:
    target = ssh_server.no_python("no-python")

    missing = ssh(target, "command -v python3 || command -v python3.11 || command -v python")
    works = ssh(target, f"echo hello > {target.path}/note && echo done")

    assert missing.returncode == 1, (missing.stdout, missing.stderr)
    assert (works.returncode, works.stdout) == (0, "done\n"), works.stderr
    assert target.host_path(f"{target.path}/note").read_text() == "hello\n"
    assert target.chroot is not None and not (target.chroot / "usr/bin/python3").exists()


@pytest.mark.slow
def test_arm64_target_runs_arm64_binaries(ssh_server: SshServer) -> None:
    target = ssh_server.arm64("arm64")

    shell = ssh(target, "uname -m")
    python = ssh(target, "python3 -c 'import platform; print(platform.machine())'")
    meminfo = ssh(target, "grep MemAvailable /proc/meminfo")
    writes = ssh(target, f"cd {target.path} && head -c 16 /dev/urandom > r && wc -c < r && rm $(mktemp)")

    assert (shell.returncode, shell.stdout) == (0, "aarch64\n"), shell.stderr
    assert (python.returncode, python.stdout) == (0, "aarch64\n"), python.stderr
    assert meminfo.returncode == 0 and meminfo.stdout.startswith("MemAvailable:"), meminfo.stderr
    assert (writes.returncode, writes.stdout.strip()) == (0, "16"), writes.stderr
    assert target.host_path(f"{target.path}/r").stat().st_size == 16


def test_memory_limited_target_kills_what_does_not_fit(ssh_server: SshServer) -> None:
    target = ssh_server.memory_limited("memory")

    cgroup = ssh(target, "cat /proc/self/cgroup")
    fits = ssh(target, 'python3.11 -c "bytearray(16 << 20); print(1)"')
    # Through a shell that reports it: ssh alone exits 255 when the remote command dies of a signal.
    too_big = ssh(target, 'python3.11 -c "bytearray(400 << 20); print(1)"; echo "exit $?"')

    assert cgroup.returncode == 0, cgroup.stderr
    assert any("edgeftl-" in line.split(":", 2)[2] for line in cgroup.stdout.splitlines()
               if "memory" in line.split(":")[1] or line.startswith("0::")), cgroup.stdout
    assert (fits.returncode, fits.stdout) == (0, "1\n"), fits.stderr
    assert too_big.stdout == f"exit {128 + 9}\n" and "Killed" in too_big.stderr, (too_big.stdout, too_big.stderr)


def test_unreachable_url_and_wrong_key_fail_in_ssh(ssh_server: SshServer) -> None:
    target = ssh_server.plain("refused")
    unreachable = dataclasses.replace(target, url=ssh_server.unreachable_url(target.path))
    stranger = dataclasses.replace(target, identity=ssh_server.wrong_identity())

    refused = ssh(unreachable, "true")
    denied = ssh(stranger, "true")

    assert refused.returncode == 255 and "refused" in refused.stderr, refused.stderr
    assert denied.returncode == 255 and "Permission denied" in denied.stderr, denied.stderr


def test_full_disk_refuses_a_mebibyte(ssh_server: SshServer) -> None:
    target = ssh_server.full_disk_root()

    small = ssh(target, f"head -c 1024 /dev/zero > {target.path}/small && echo ok")
    big = ssh(target, f"head -c 1048576 /dev/zero > {target.path}/big")

    assert (small.returncode, small.stdout) == (0, "ok\n"), small.stderr
    assert big.returncode != 0 and "No space left on device" in big.stderr, big.stderr


def test_read_only_root_refuses_writes(ssh_server: SshServer) -> None:
    target = ssh_server.read_only_root()

    done = ssh(target, f"mkdir {target.path}/edgeftl || echo x > {target.path}/file")

    assert done.returncode != 0 and "Read-only file system" in done.stderr, done.stderr
    assert list(target.host_path(target.path).iterdir()) == []


@pytest.mark.parametrize("kind", ["plain", "memory_limited", pytest.param("arm64", marks=pytest.mark.slow)])
def test_teardown_kills_what_sessions_left_running(kind: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = SshServer(tmp_path_factory.mktemp("ssh-teardown"))
    try:
        target = getattr(server, kind)("agent")
        # What flash does for the supervised service: a daemon in its own session, in the target.
        started = ssh(target, f"cd {target.path} && (setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > pid)")
        assert started.returncode == 0, started.stderr
        pid = int(target.host_path(f"{target.path}/pid").read_text())
        assert _alive(pid)
    finally:
        server.close()
    assert not _alive(pid)
    assert ssh(target, "true").returncode == 255  # the sshd stopped too


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
