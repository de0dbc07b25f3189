"""`edgeftl package` + `edgeftl flash` against real sshd targets (tests/ssh_targets.py) and a real Mosquitto.

- A loopback target: the flashed agent runs as a supervised service, trains there and its update
  is aggregated by a coordinator here; a second flash of the same archive copies nothing; a
  rotted file is the only one a third flash copies.
- Bad targets in one run (unreachable, refused login, full disk, read-only path, no Python, a
  memory plan that does not fit): one clear line each, the good target still completes, no
  half-installed release anywhere. A wrong key and a damaged archive on their own.
The ARM64 flash (an emulated Debian root behind sshd, under qemu-user) is tests/test_flash_arm64.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.evaluate import make_evaluator
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.data import write_csv
from edgeftl.device.link import Link, MqttConnection
from edgeftl.device.protocol.manifest import read_manifest
from edgeftl.device.runtime import trainable_vector

from fixtures_build import bundle, keyword_dataset
from ssh_targets import SshServer, Target

pytest_plugins = ["ssh_targets"]
SEQ = "64"  # the tiny bundles' max_seq_len


def edgeftl(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeftl.device.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def make_package(folder: Path, platform: str, out: Path) -> Path:
    done = edgeftl("package", "--bundle", str(folder), "--platform", platform, "--python", "3.11", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle(tmp_path_factory, "bert-int8")


@pytest.fixture(scope="module")
def archive(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_package(tiny, "linux-x86_64", tmp_path_factory.mktemp("package") / "tiny-x86_64.tar.gz")


def flash(archive: Path, targets: list[Target | str], broker: str, tmp: Path, *extra: str,
          identity: Path | None = None) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """Run `edgeftl flash` on these targets; (the process, its --json results)."""
    real = [t for t in targets if isinstance(t, Target)]
    out = tmp / f"flash-{uuid.uuid4().hex[:6]}.json"
    args = ["flash", str(archive), "--broker", broker, "--identity", str(identity or real[0].identity),
            "--known-hosts", str(real[0].known_hosts), "--json", str(out), "--threads", "1", "--seq", SEQ, *extra]
    for target in targets:
        args += ["--target", target.url if isinstance(target, Target) else target]
    done = edgeftl(*args)
    print(done.stdout[-6000:], done.stderr[-2000:])
    results = json.loads(out.read_text()) if out.is_file() else []
    return done, results


def give_data(target: Target, seed: int) -> None:
    data = target.host_path(f"{target.path}/data/train.csv")
    data.parent.mkdir(parents=True, exist_ok=True)
    write_csv(data, *keyword_dataset(48, seed=seed))


def one_round(broker: tuple[str, int], folder: Path, prefix: str, devices: int, tmp: Path) -> list[dict]:
    """A coordinator here runs one round with the flashed devices; its records."""
    host, port = broker
    manifest = read_manifest(folder)
    config = CoordinatorConfig(out=tmp / f"run-{prefix}", rounds=1, steps=3, batch=8, lr=3e-2, deadline_s=600,
                               wait_devices=devices, wait_devices_s=600, prefix=prefix)
    link = Link.coordinator(MqttConnection(f"mqtt://{host}:{port}", f"coord-{prefix}"), prefix)
    test_csv = write_csv(tmp / f"test-{prefix}.csv", *keyword_dataset(32, seed=7))
    coordinator = Coordinator(link, folder, manifest, trainable_vector(folder, manifest), config,
                              evaluate=make_evaluator(folder, test_csv))
    try:
        coordinator.connect()
        online = coordinator.wait_for_devices()
        assert online == devices
        return coordinator.run()
    finally:
        coordinator.link.close()


def command_lines() -> list[list[str]]:
    """Every running process's argv (processes that end while being read are skipped)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            found.append((proc / "cmdline").read_bytes().decode().split("\0"))
        except (OSError, ValueError):
            continue
    return found


def agent_command_lines(target: Target) -> list[str]:
    """The command lines of the processes running from the target's folder (supervisor and agent)."""
    lines = [" ".join(words) for words in command_lines()]
    return [line for line in lines if target.path in line and "device" in line]


def ssh_masters(target: Target) -> list[str]:
    """ssh master connections (ControlPersist) still open to the target's port."""
    return [" ".join(words) for words in command_lines() if words[:1] == ["ssh"]
            and any(w.startswith("ControlPersist") for w in words) and str(target.port) in words]


def release_files(target: Target) -> Path:
    return target.host_path(f"{target.path}/current")


def test_flash_starts_an_agent_that_federates_and_a_second_flash_copies_nothing(
        archive: Path, tiny: Path, ssh_server: SshServer, mosquitto_broker, tmp_path: Path) -> None:
    # Prepare: a target folder with the device's data in it
    target = ssh_server.plain("pi")
    target = dataclasses.replace(target, url=target.url + "?id=pi-0")
    give_data(target, seed=3)
    prefix = f"flash-{uuid.uuid4().hex[:6]}"
    broker = f"mqtt://{mosquitto_broker[0]}:{mosquitto_broker[1]}"

    secret = f"s3cret-{uuid.uuid4().hex}"  # Mosquitto here is anonymous: it accepts any password
    (tmp_path / "password").write_text(secret + "\n")

    # Execute: flash, then one round with a coordinator here, then look at the fleet
    done, results = flash(archive, [target], broker, tmp_path, "--prefix", prefix, "--rounds", "1",
                          "--password-file", str(tmp_path / "password"), "--username", "pi-0")
    assert done.returncode == 0, done.stdout[-3000:]
    agents = agent_command_lines(target)
    assert ssh_masters(target) == []  # the flash closed the ssh connection it kept open
    records = one_round(mosquitto_broker, tiny, prefix, 1, tmp_path)
    seen = edgeftl("fleet", "status", "--broker", broker, "--prefix", prefix, "--json")

    # Assert: the agent the service started trained there and its update was aggregated
    [row] = results
    assert row["ok"] and row["device_id"] == "pi-0" and row["platform"] == "linux-x86_64", row
    assert row["copied_files"] > 100 and row["planned_peak_mib"] > 0 and row["free_mib"] > row["planned_peak_mib"]
    [record] = records
    assert record["aggregated"] and record["updates_received"] == 1, record
    assert record["devices"]["pi-0"]["platform_machine"] == "x86_64"
    current = release_files(target)
    assert current.is_symlink() and (current / "edgeftl-package.json").is_file()
    # The password is a 0600 file there, named (never spelled) on the agent's command line
    config = target.host_path(f"{target.path}/config")
    argv = json.loads((config / "agent.json").read_text())["argv"]
    assert (config / "agent.json").stat().st_mode & 0o777 == 0o600
    assert (config / "password").stat().st_mode & 0o777 == 0o600 and (config / "password").read_text() == secret + "\n"
    assert argv[argv.index("--password-file") + 1] == f"{target.path}/config/password"
    assert agents and all(secret not in line for line in agents), agents
    # The fleet: the device, online or finished, with the flashed package and its last round
    assert seen.returncode == 0, seen.stderr
    [device] = json.loads(seen.stdout)["devices"]
    assert device["device_id"] == "pi-0", device
    assert device["package_id"] == current.resolve().name and device["last_round"] == 0, device

    # Execute: the same archive again
    again, results = flash(archive, [target], broker, tmp_path, "--prefix", prefix, "--rounds", "1")

    # Assert: nothing copied, the same release, the agent started again
    assert again.returncode == 0, again.stdout[-3000:]
    [row] = results
    assert row["ok"] and row["copied_files"] == 0 and row["copied_bytes"] == 0, row
    assert "unchanged" in row["result"] and release_files(target).resolve() == current.resolve()

    # Execute: one file of the release rots on the board's disk, then a third flash
    rotten = current.resolve() / "site/edgeftl/device/plan.py"
    rotten.write_bytes(rotten.read_bytes() + b"\n# a flipped sector\n")
    repaired, results = flash(archive, [target], broker, tmp_path, "--prefix", prefix, "--rounds", "1")

    # Assert: exactly that file came again, and the release verifies
    assert repaired.returncode == 0, repaired.stdout[-3000:]
    [row] = results
    assert row["ok"] and row["copied_files"] == 1, row
    assert not rotten.read_bytes().endswith(b"# a flipped sector\n")

    # Execute: look at the board's service, stop it, look again
    board = ["--target", target.url, "--identity", str(target.identity), "--known-hosts", str(target.known_hosts)]
    logs = edgeftl("fleet", "logs", *board)
    stopped = edgeftl("fleet", "stop", *board)
    after = edgeftl("fleet", "logs", *board)

    # Assert: it ran supervised with a log, `stop` ended supervisor and agent, and says so
    assert logs.returncode == 0 and "running (supervised" in logs.stdout, logs.stdout + logs.stderr
    assert stopped.returncode == 0 and stopped.stdout.strip().endswith(": stopped"), stopped.stdout
    assert "not running" in after.stdout and agent_command_lines(target) == []


def test_bad_targets_each_get_one_line_and_the_good_one_completes(
        archive: Path, ssh_server: SshServer, mosquitto_broker, tmp_path: Path) -> None:
    # Prepare: one good target and one of each failure
    good, small = ssh_server.plain("good"), ssh_server.memory_limited("small")
    for seed, target in enumerate((good, small)):
        give_data(target, seed=4 + seed)
    port = good.port
    targets: dict[str, Target | str] = {
        "good": dataclasses.replace(good, url=good.url + "?id=good-0"),
        "unreachable": ssh_server.unreachable_url("/srv/edgeftl"),
        "refused": f"ssh://nosuchuser@127.0.0.1:{port}/srv/edgeftl",
        "full": ssh_server.full_disk_root(),
        "read-only": ssh_server.read_only_root(),
        "no-python": ssh_server.no_python("bare"),
        "no-data": ssh_server.plain("empty"),
        "small": small,
    }
    broker = f"mqtt://{mosquitto_broker[0]}:{mosquitto_broker[1]}"

    # Execute: --batch 512 needs ~260 MiB at 64 tokens: more than the 160 MiB target has
    done, results = flash(archive, list(targets.values()), broker, tmp_path, "--batch", "512",
                          "--prefix", f"bad-{uuid.uuid4().hex[:6]}", "--rounds", "1")

    # Assert: exit 1, one row per target in order, each failure says why, the good one started
    assert done.returncode == 1
    rows = dict(zip(targets, results))
    assert len(results) == len(targets)
    assert rows["good"]["ok"], rows["good"]
    expected = {"unreachable": "connection refused", "refused": "ssh refused the key",
                "full": "disk full", "read-only": "cannot write to", "no-python": "no Python 3.11 on the target",
                "no-data": "no training data at",
                "small": "not started"}
    for name, words in expected.items():
        assert not rows[name]["ok"] and words in rows[name]["result"], (name, rows[name])
        assert "\n" not in rows[name]["result"]
        assert rows[name]["result"] in done.stdout  # the table shows the whole line
    # No half-installed release anywhere: no partial folders, and no `current` where nothing started
    for name in ("full", "read-only", "small"):
        target = targets[name]
        assert isinstance(target, Target)
        releases = target.host_path(f"{target.path}/releases")
        partials = [p.name for p in releases.iterdir() if ".partial" in p.name] if releases.is_dir() else []
        assert partials == [], (name, partials)
        assert not target.host_path(f"{target.path}/current").exists(), name
    assert "7 failed" in done.stdout

    # Execute: the refused board again, with --force
    forced, results = flash(archive, [targets["small"]], broker, tmp_path, "--batch", "512", "--force",
                            "--prefix", f"bad-{uuid.uuid4().hex[:6]}", "--rounds", "1")

    # Assert: the release it had received and verified is reused (nothing copied) and started
    assert forced.returncode == 0, forced.stdout[-3000:]
    [row] = results
    assert row["ok"] and row["copied_files"] == 0 and "starting anyway (--force)" in forced.stdout, row


def test_a_wrong_key_fails_in_one_line(archive: Path, ssh_server: SshServer, mosquitto_broker,
                                       tmp_path: Path) -> None:
    # Prepare
    target = ssh_server.plain("locked")
    broker = f"mqtt://{mosquitto_broker[0]}:{mosquitto_broker[1]}"

    # Execute
    done, results = flash(archive, [target], broker, tmp_path, identity=ssh_server.wrong_identity())

    # Assert
    assert done.returncode == 1
    [row] = results
    assert not row["ok"] and "ssh refused the key" in row["result"], row
    assert not target.host_path(f"{target.path}/releases").exists()


def test_a_damaged_archive_is_refused_before_any_target_is_touched(
        archive: Path, ssh_server: SshServer, mosquitto_broker, tmp_path: Path) -> None:
    # Prepare: the same archive with one member's bytes changed (its manifest untouched)
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(damaged, "w:gz") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("device/plan.py"):
                data = data.replace(b"peak", b"peek", 1)
            out.addfile(member, None if data is None else io.BytesIO(data))
    target = ssh_server.plain("untouched")
    broker = f"mqtt://{mosquitto_broker[0]}:{mosquitto_broker[1]}"

    # Execute
    done, _ = flash(damaged, [target], broker, tmp_path)

    # Assert: one line naming the member, nothing on the target
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "device/plan.py" in lines[0], lines
    assert not target.host_path(f"{target.path}/releases").exists()
    assert os.listdir(target.host_path(target.path)) in ([], ["data"])
