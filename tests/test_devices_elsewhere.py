"""Devices that are not this host: Python 3.10 (onnxruntime 1.23.2) and 3.12, emulated ARM64 boards (3.11, 3.13).

The boards are Debian ARM64 roots run under qemu-user (tools/emulated_root.py), with the
device's dependencies installed by the board's own pip from their aarch64 wheels and edgeftl
from a wheel of this checkout. In each environment:

- the portable runtime trains tiny bundles exactly as the training build does on the host
  (same plan, tolerance as tests/test_equivalence.py);
- `edgeftl device train` fits the keyword task there (the run tests/test_device_runtime.py makes);
- both boards join one federation over a real Mosquitto beside two x86 devices, and their
  updates are accepted and aggregated every round.

Emulated matrix products run ~110-210x slower than native (MiniLM), so bundles are the tiny ones.
Needs root for the boards (debootstrap, chroot, binfmt_misc); under CI nothing is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_equivalence import TOLERANCE

from edgeftl.coordinator.bundler.probe import compare, probe_plan, train_reference
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.evaluate import make_evaluator
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.data import write_csv
from edgeftl.device.link import Link, MqttConnection
from edgeftl.device.protocol.manifest import read_manifest
from edgeftl.device.runtime import BundleRuntime, trainable_vector

from conftest import in_ci
from device_envs import DeviceEnv, board_env, edgeftl_wheel, emulated_root, machine_of, native_env
from fixtures_build import bundle, keyword_dataset, reference

pytestmark = pytest.mark.slow

ENVIRONMENTS = {"x86_64-py3.10": ("native", "3.10"), "x86_64-py3.12": ("native", "3.12"),
                "arm64-bookworm": ("board", "bookworm"), "arm64-trixie": ("board", "trixie")}
BOARDS = ["arm64-bookworm", "arm64-trixie"]
EXPECTED = {"x86_64-py3.10": ("x86_64", "3.10"), "x86_64-py3.12": ("x86_64", "3.12"),
            "arm64-bookworm": ("aarch64", "3.11"), "arm64-trixie": ("aarch64", "3.13")}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return edgeftl_wheel(tmp_path_factory.mktemp("wheel"))


class Environments(dict):
    """The environments made so far; asking for one that could not be made skips (fails under CI)."""

    def __init__(self, made: dict[str, DeviceEnv], problems: dict[str, str]) -> None:
        super().__init__(made)
        self.problems = problems

    def __getitem__(self, name: str) -> DeviceEnv:
        if name in self.problems:
            (pytest.fail if in_ci() else pytest.skip)(f"{name}: {self.problems[name]}")
        return super().__getitem__(name)


@pytest.fixture(scope="session")
def environments(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Environments:
    """Every environment, made (or taken from the cache) once per session."""
    session = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    made, problems = {}, {}
    for name, (kind, which) in ENVIRONMENTS.items():
        if kind == "board" and os.geteuid() != 0:
            problems[name] = "emulated boards need root (debootstrap, chroot, binfmt_misc)"
            continue
        try:
            made[name] = (native_env(which, wheel, tmp_path_factory.mktemp(name)) if kind == "native"
                          else board_env(which, wheel, session))
        except (RuntimeError, emulated_root.RootError) as exc:
            problems[name] = str(exc)
    return Environments(made, problems)


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_environment_is_what_it_claims(name: str, environments: Environments) -> None:
    # Execute
    seen = machine_of(environments[name])

    # Assert: the architecture and Python asked for, running a stock (non-training) onnxruntime
    machine, python = EXPECTED[name]
    assert seen["machine"] == machine and seen["python"].startswith(python + "."), seen
    print(f"{name}: {seen}")


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_every_op_a_bundle_may_hold_has_a_kernel_there(name: str, environments: Environments) -> None:
    # Prepare: the non-standard ops portable graphs may hold, and the int4 lower stack's MatMulNBits
    from edgeftl.coordinator.bundler.portable import STOCK_CONTRIB_OPS

    env = environments[name]
    wanted = sorted([*STOCK_CONTRIB_OPS, ("com.microsoft", "MatMulNBits")])
    code = ("import json, sys; from onnxruntime.capi import onnxruntime_pybind11_state as c; "
            "k = {(d.domain, d.op_name) for d in c.get_all_opkernel_def() if d.provider == 'CPUExecutionProvider'}; "
            "print(json.dumps([op for op in json.loads(sys.argv[1]) if tuple(op) not in k]))")

    # Execute
    done = env.run([env.python, "-c", code, json.dumps(wanted)], timeout=300)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("kind", ["bert-int8", "bert-int8-top1", "llama-int8"])
@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_portable_runtime_matches_the_training_build(name: str, kind: str, environments: Environments,
                                                     tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: the plan and the training build's result on the host
    env = environments[name]
    folder = bundle(tmp_path_factory, kind)
    plan = probe_plan(BundleRuntime(folder, threads=1), seed=1, steps=3, lr=1e-2)
    np.savez(tmp_path / "plan.npz", **plan)
    expected = train_reference(reference(tmp_path_factory, kind), plan, threads=1)

    # Execute: the same plan on the device runtime there
    result = f"{env.share(tmp_path)}/result.npz"
    done = env.run([env.python, "-m", "edgeftl.coordinator.bundler.training_job", "portable", env.share(folder),
                    f"{env.share(tmp_path)}/plan.npz", result, "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(env.host(result)) as data:
        actual = dict(data)

    # Assert
    differences = compare(actual, expected, plan)
    assert all(value <= TOLERANCE[what] for what, value in differences.items()), (name, kind, differences)


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_device_train_there_lowers_the_loss(name: str, environments: Environments, tmp_path: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: the run tests/test_device_runtime.py makes on the host (60 steps of 16, lr 2e-2)
    env = environments[name]
    train = write_csv(tmp_path / "train.csv", *keyword_dataset(64, seed=0))
    held_out = write_csv(tmp_path / "eval.csv", *keyword_dataset(64, seed=1))

    # Execute
    done = env.run(env.edgeftl("device", "train", "--bundle", env.share(bundle(tmp_path_factory, "bert-int8")),
                               "--data", env.share(train), "--eval", env.share(held_out), "--steps", "60",
                               "--batch", "16", "--lr", "2e-2", "--seed", "0", "--threads", "1", "--json", "--quiet"))

    # Assert: a fresh 2-label head starts near ln 2; training fits the keyword rule
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: {summary}")
    assert (summary["platform_machine"], summary["platform_python"][:4]) == EXPECTED[name] and summary["steps"] == 60
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    assert summary["eval_accuracy"] >= 0.9


def test_arm64_boards_federate_beside_x86_devices(mosquitto_broker, environments: Environments,
                                                 tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: a coordinator here, two x86 device processes and the two boards, one data file each
    host, port = mosquitto_broker
    url = f"mqtt://{host}:{port}"
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest = read_manifest(folder)
    prefix = f"arm-{uuid.uuid4().hex[:6]}"
    test_csv = write_csv(tmp_path / "test.csv", *keyword_dataset(64, seed=7))
    devices: dict[str, tuple[DeviceEnv | None, Path]] = {}
    for i, name in enumerate(["x86-0", "x86-1", *BOARDS]):
        env = environments[name] if name in BOARDS else None
        devices[name] = (env, write_csv(tmp_path / f"{name}.csv", *keyword_dataset(48, seed=50 + i)))
    rounds = 2
    config = CoordinatorConfig(out=tmp_path / "run", rounds=rounds, steps=3, batch=16, lr=3e-2, deadline_s=900,
                               wait_devices=len(devices), wait_devices_s=600, prefix=prefix, codec="topk:0.25+int8")
    link = Link.coordinator(MqttConnection(url, f"coord-{prefix}"), prefix)
    coordinator = Coordinator(link, folder, manifest, trainable_vector(folder, manifest), config,
                              evaluate=make_evaluator(folder, test_csv))
    processes = []
    for name, (env, data) in devices.items():
        args = ["device", "run", "--broker", url, "--id", name, "--prefix", prefix, "--threads", "1",
                "--rounds", str(rounds)]
        if env is None:
            command = [sys.executable, "-m", "edgeftl.device.cli", *args, "--bundle", str(folder), "--data", str(data)]
        else:
            command = env.command(env.edgeftl(*args, "--bundle", env.share(folder), "--data", env.share(data)))
        log = open(tmp_path / f"{name}.log", "w")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    # Execute
    try:
        coordinator.connect()
        online = coordinator.wait_for_devices()
        records = coordinator.run() if online == len(devices) else []
    finally:
        coordinator.link.close()
        for process in processes:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()

    # Assert: every device's update aggregated each round, the boards reporting aarch64
    logs = {name: (tmp_path / f"{name}.log").read_text()[-1500:] for name in devices}
    assert online == len(devices), logs
    assert [r["round"] for r in records] == list(range(rounds))
    for record in records:
        assert record["updates_received"] == len(devices) and record["updates_rejected"] == 0, (record, logs)
        assert record["aggregated"] and set(record["devices"]) == set(devices)
        for name in BOARDS:
            assert record["devices"][name]["platform_machine"] == "aarch64"
        print(f"round {record['round']}: accuracy {record.get('accuracy')} "
              + ", ".join(f"{d} {m['platform_machine']}/py{m['platform_python']} train {m.get('train_time_s')} s"
                          for d, m in record["devices"].items()))
    assert records[-1]["loss"] < records[0]["loss"] or records[-1]["accuracy"] >= records[0]["accuracy"]
