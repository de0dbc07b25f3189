"""A secured federation on real Mosquitto, configured by `edgeftl certs` and `edgeftl broker-config`:
credentials, ACLs, TLS and mTLS at the broker; signatures checked by the devices and the
coordinator even where the broker lets a message through."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.link import Incoming, Link, LinkError, MqttConnection, Refused
from edgeftl.device.link.security import TransportSecurity
from edgeftl.device.protocol import auth
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.messages import Global, Task, Update

from conftest import _accepts, _free_port, _stop, in_ci, mosquitto_binary
from fixtures_build import bundle, keyword_dataset

SHA = "ef" * 32
DEVICES = ("dev-1", "dev-2")
WAIT_S = 10.0
PREFIX = "edgeftl"  # the prefix broker-config writes the ACL for


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "c"
    assert main(["certs", "--out", str(out), "--devices", ",".join(DEVICES)]) == 0
    return out


def start_broker(certs: Path, folder: Path, mtls: bool) -> tuple[subprocess.Popen[bytes], str]:
    binary = mosquitto_binary()
    if binary is None:
        if in_ci():
            pytest.fail("CI is set and mosquitto is not installed", pytrace=False)
        pytest.skip("mosquitto is not installed")
    port = _free_port()
    conf = folder / "mosquitto.conf"
    argv = ["broker-config", "--certs", str(certs), "--port", str(port), "--bind", "127.0.0.1", "--out", str(conf),
            "--run-as", getpass.getuser(), *(["--mtls"] if mtls else [])]
    assert main(argv) == 0
    log = (folder / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    end = time.monotonic() + WAIT_S
    while not _accepts(port) and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.05)
    if not _accepts(port):
        _stop(proc)
        pytest.fail(f"mosquitto did not start: {(folder / 'mosquitto.log').read_text()[-500:]}")
    return proc, f"mqtts://127.0.0.1:{port}"


@pytest.fixture
def broker(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh broker per test: the ACL names the one prefix, so retained messages must not carry over."""
    proc, url = start_broker(certs, tmp_path_factory.mktemp("broker"), mtls=False)
    yield url
    _stop(proc)


def party(certs: Path, name: str) -> Path:
    return certs / name if name == "coordinator" else certs / "devices" / name


def security(certs: Path, user: str | None, password_of: str | None = None, cert: bool = False) -> TransportSecurity:
    folder = party(certs, password_of or user or "coordinator")
    return TransportSecurity(certs / "ca.crt", folder / "client.crt" if cert else None,
                             folder / "client.key" if cert else None, user,
                             folder / "password" if user else None)


def signing(certs: Path, name: str) -> Ed25519PrivateKey:
    return auth.load_private_key(party(certs, name) / "signing.pem")


def connect(link: Link) -> Link:
    link.connect(WAIT_S)
    return link


def take(link: Link, count: int, timeout_s: float = WAIT_S) -> list[Incoming | Refused]:
    items: list[Incoming | Refused] = []
    end = time.monotonic() + timeout_s
    while len(items) < count and time.monotonic() < end:
        item = link.receive(0.1)
        if item is not None:
            items.append(item)
    return items


def update(device: str, seq: int = 1) -> Update:
    return Update("r1", 0, SHA, device, 10, seq, Encoded("none", 4, {"values": np.ones(4, np.float32)}), {})


def coordinator(certs: Path, url: str, prefix: str) -> Link:
    keys = auth.Keys(signing(certs, "coordinator"), auth.read_allowlist(certs / "allowlist.json"))
    return Link.coordinator(MqttConnection(url, f"coord-{prefix}", security=security(certs, "coordinator")), prefix,
                            keys=keys)


def device(certs: Path, url: str, prefix: str, name: str, key_of: str | None = None) -> Link:
    keys = auth.Keys(signing(certs, key_of or name), {auth.COORDINATOR: signing(certs, "coordinator").public_key()})
    return Link.device(MqttConnection(url, f"{name}-{prefix}", security=security(certs, name)), prefix, name, keys=keys)


# ---- the broker: who may connect, and what each may publish and read -----------------------------


def test_clients_without_the_right_credentials_are_refused_with_one_clear_line(certs: Path, broker: str) -> None:
    stolen = (certs / "devices/dev-2/password").read_text().strip()
    cases = {"anonymous": security(certs, None), "wrong password": security(certs, "dev-1", password_of="dev-2")}
    for label, sec in cases.items():
        with pytest.raises(LinkError) as caught:
            MqttConnection(broker, f"x-{label.replace(' ', '-')}", security=sec).connect(WAIT_S)
        assert "refused" in str(caught.value) and "not authorised" in str(caught.value), label
        assert stolen not in str(caught.value)


def test_a_device_cannot_publish_as_another_or_read_other_updates(certs: Path, broker: str) -> None:
    # Prepare: the coordinator, dev-1, and dev-2 also as a bare connection reading every update topic
    coord = connect(coordinator(certs, broker, PREFIX))
    dev1 = connect(device(certs, broker, PREFIX, "dev-1"))
    dev2 = connect(device(certs, broker, PREFIX, "dev-2"))
    snooped: list[str] = []
    snoop = MqttConnection(broker, "dev-2-snoop", security=security(certs, "dev-2"))
    snoop.on_frame = lambda topic, frame: snooped.append(topic)
    snoop.subscribe([f"{PREFIX}/update/+", f"{PREFIX}/update/+/_c/+"])
    snoop.connect(WAIT_S)
    # Execute: dev-2 publishes on dev-1's update topic (bytes signed with its own key), then its own
    # update; dev-1 sends its update
    dev2.connection.send(f"{PREFIX}/update/dev-1", dev2.keys.sign(update("dev-1", seq=7)), 1, False)
    dev2.send(update("dev-2"))
    dev1.send(update("dev-1"))
    got = take(coord, 4)
    # Assert: the coordinator has both statuses and both genuine updates, nothing more; the snoop
    # (dev-2's login) read no update, not even its own
    messages = sorted((i.device_id, type(i.message).__name__, getattr(i.message, "seq", None))
                      for i in got if isinstance(i, Incoming))
    assert messages == [("dev-1", "Status", None), ("dev-1", "Update", 1), ("dev-2", "Status", None),
                        ("dev-2", "Update", 1)], got
    assert take(coord, 1, timeout_s=1.0) == []
    assert snooped == []
    for link in (coord, dev1, dev2):
        link.close()
    snoop.close()


def test_devices_refuse_a_task_and_a_global_signed_with_another_key(certs: Path, broker: str) -> None:
    # Prepare: the coordinator's own broker credentials (the broker lets it publish), a rogue key
    dev1 = connect(device(certs, broker, PREFIX, "dev-1"))
    rogue = Link.coordinator(MqttConnection(broker, "forger", security=security(certs, "coordinator")), PREFIX,
                             keys=auth.Keys(Ed25519PrivateKey.generate()))
    connect(rogue)
    # Execute
    rogue.send(Task("r1", 0, SHA, ("dev-1",), 60.0, 0.01, "none", steps=100_000))
    rogue.send(Global("r1", 0, SHA, Encoded("none", 4, {"values": np.full(4, 1e6, np.float32)}), base_round=-1))
    got = take(dev1, 2)
    # Assert
    assert [i.reason for i in got if isinstance(i, Refused)] == [
        "bad signature: task not signed with the key of the coordinator",
        "bad signature: global not signed with the key of the coordinator"]
    rogue.close()
    dev1.close()


def test_the_coordinator_refuses_an_update_signed_with_another_devices_key(certs: Path, broker: str) -> None:
    coord = connect(coordinator(certs, broker, PREFIX))
    impostor = connect(device(certs, broker, PREFIX, "dev-1", key_of="dev-2"))  # dev-1's login, dev-2's key
    impostor.send(update("dev-1"))
    got = take(coord, 2)
    assert [i.reason for i in got if isinstance(i, Refused)] == [
        "bad signature: status not signed with the key of device 'dev-1'",
        "bad signature: update not signed with the key of device 'dev-1'"]
    impostor.close()
    coord.close()


def test_mutual_tls_admits_a_device_with_its_certificate_and_refuses_one_without(certs: Path, tmp_path: Path) -> None:
    proc, url = start_broker(certs, tmp_path, mtls=True)
    try:
        with_cert = MqttConnection(url, "mtls-yes", security=security(certs, "dev-1", cert=True))
        with_cert.connect(WAIT_S)
        assert with_cert.connected
        with_cert.close()
        with pytest.raises(LinkError, match="client certificate"):
            MqttConnection(url, "mtls-no", security=security(certs, "dev-1")).connect(3.0)
    finally:
        _stop(proc)


def test_tls_checks_the_broker_certificate_and_urls_never_carry_passwords(certs: Path, broker: str) -> None:
    wrong_ca = TransportSecurity(certs / "devices/dev-1/client.crt", None, None, "dev-1",
                                 certs / "devices/dev-1/password")
    with pytest.raises(LinkError, match="TLS failure"):
        MqttConnection(broker, "bad-ca", security=wrong_ca).connect(WAIT_S)
    with pytest.raises(ValueError, match="password-file") as caught:
        MqttConnection("mqtts://dev-1:hunter2@127.0.0.1:8883", "x")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ValueError, match="not loopback"):
        MqttConnection("mqtt://10.1.2.3", "x")
    MqttConnection("mqtt://10.1.2.3", "x", security=TransportSecurity(insecure=True))


def test_certs_refuses_to_overwrite_and_keeps_private_files_private(certs: Path, capsys) -> None:
    assert main(["certs", "--out", str(certs), "--devices", "dev-1"]) == 2
    assert "--force" in capsys.readouterr().err
    private = [certs / "ca.key", certs / "broker.key", certs / "passwords", *(certs / "devices/dev-1").glob("*"),
               *(certs / "coordinator").glob("*")]
    modes = {p.name: p.stat().st_mode & 0o777 for p in private}
    assert {modes[n] for n in ("ca.key", "broker.key", "passwords", "client.key", "signing.pem", "password")} == {0o600}
    assert json.loads((certs / "allowlist.json").read_text()).keys() == set(DEVICES)


# ---- a whole federation ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_small_federation_runs_signed_over_tls(certs: Path, broker: str, tmp_path: Path,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: a pinned copy of the tiny bundle, one data file per device, the CLI as users run it
    folder = tmp_path / "bundle"
    shutil.copytree(bundle(tmp_path_factory, "bert-int8"), folder)
    assert main(["certs", "--out", str(certs), "--pin", str(folder)]) == 0
    prefix, rounds = PREFIX, 2
    cli = [sys.executable, "-m", "edgeftl.device.cli"]
    processes, logs = [], {}
    for i, name in enumerate(DEVICES):
        data = write_csv(tmp_path / f"{name}.csv", *keyword_dataset(32, seed=60 + i))
        own = certs / "devices" / name
        logs[name] = tmp_path / f"{name}.log"
        processes.append(subprocess.Popen(
            [*cli, "device", "run", "--broker", broker, "--bundle", str(folder), "--data", str(data), "--id", name,
             "--prefix", prefix, "--threads", "1", "--rounds", str(rounds), "--ca-file", str(own / "ca.crt"),
             "--username", name, "--password-file", str(own / "password"), "--signing-key", str(own / "signing.pem")],
            stdout=logs[name].open("w"), stderr=subprocess.STDOUT))
    me = certs / "coordinator"
    try:
        result = subprocess.run(
            [*cli, "coordinator", "--broker", broker, "--bundle", str(folder), "--out", str(tmp_path / "run"),
             "--rounds", str(rounds), "--steps", "2", "--batch", "8", "--deadline-s", "120", "--wait-devices", "2",
             "--wait-devices-s", "60", "--prefix", prefix, "--ca-file", str(me / "ca.crt"), "--username", "coordinator",
             "--password-file", str(me / "password"), "--signing-key", str(me / "signing.pem"),
             "--allowlist", str(certs / "allowlist.json")], capture_output=True, text=True, timeout=300)
    finally:
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    # Assert: every round aggregated both devices' signed updates, nothing refused
    device_logs = {name: path.read_text()[-800:] for name, path in logs.items()}
    assert result.returncode == 0, (result.stderr[-1500:], device_logs)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(rounds))
    for record in records:
        assert record["updates_received"] == 2 and record["updates_rejected"] == 0, (record, device_logs)
    assert all("bad signature" not in text for text in device_logs.values()), device_logs
