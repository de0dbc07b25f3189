"""Flash an ARM64 board: `edgeftl package --platform linux-aarch64`, then `edgeftl flash` over ssh into an
emulated Debian bookworm ARM64 root (tests/ssh_targets.py: sshd chroots each session there, so
bash, tar and python3 are ARM64 binaries run by qemu-user). The packaged runtime's own aarch64
wheels verify, plan and start there with the board's bare python3 (no pip, no venv), and the
agent's update is aggregated by a coordinator here.

Slow: under emulation the memory plan's probes and the agent each load onnxruntime (~2000x slower
than native for matrix products; the bundle is the tiny one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_flash import flash, give_data, make_package, one_round

from fixtures_build import bundle
from ssh_targets import SshServer

pytest_plugins = ["ssh_targets"]
pytestmark = pytest.mark.slow


def test_flash_an_arm64_board_whose_update_is_aggregated(ssh_server: SshServer, mosquitto_broker, tmp_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: the tiny bundle packaged for aarch64, a board folder holding the device's data
    folder = bundle(tmp_path_factory, "bert-int8")
    archive = make_package(folder, "linux-aarch64", tmp_path / "tiny-aarch64.tar.gz")
    board = ssh_server.arm64("board")
    give_data(board, seed=5)
    board_url = board.url + "?id=arm-0"
    prefix = "flash-arm64"
    broker = f"mqtt://{mosquitto_broker[0]}:{mosquitto_broker[1]}"

    # Execute: flash (verify, plan and start there), then one round with a coordinator here
    done, results = flash(archive, [dataclasses.replace(board, url=board_url)],
                          broker, tmp_path, "--prefix", prefix, "--rounds", "1", "--batch", "8")
    assert done.returncode == 0, done.stdout[-4000:]
    records = one_round(mosquitto_broker, folder, prefix, 1, tmp_path)

    # Assert: the board is aarch64, everything verified there, the plan fit, its update was aggregated
    [row] = results
    assert row["ok"] and row["platform"] == "linux-aarch64" and row["planned_peak_mib"] > 0, row
    [record] = records
    assert record["aggregated"] and record["updates_received"] == 1, record
    assert record["devices"]["arm-0"]["platform_machine"] == "aarch64"
    print(f"arm64 flash: {row}")
