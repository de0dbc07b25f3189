"""Secure aggregation in a real federation: tiny BERT devices and the coordinator through Mosquitto."""

from __future__ import annotations

import threading

import numpy as np

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.agent import AgentConfig, DeviceAgent
from edgeftl.device.data import write_csv
from edgeftl.device.link import Link, MqttConnection
from edgeftl.device.protocol.manifest import read_manifest
from edgeftl.device.protocol.topics import device_client_id
from edgeftl.device.secagg.fixedpoint import FixedPoint

from fixtures_build import bundle, keyword_dataset

PREFIX = "edgeftl-sa"
SIGNED_PREFIX = "edgeftl-sa-signed"  # apart from the unsigned test's retained statuses on the same broker


def _agent(url: str, name: str, folder, data) -> DeviceAgent:
    link = Link.device(MqttConnection(url, device_client_id(name)), PREFIX, name)
    return DeviceAgent(link, AgentConfig(name, folder, data, threads=1, secure_aggregation=True))


def _record_inputs(agent: DeviceAgent, seen: dict) -> None:
    """Keep each device's plain delta and sample count (test-side only) to compute the expected FedAvg."""
    submit = agent.secagg.submit

    def recording(task, delta, samples):
        seen[agent.config.device_id] = (delta.copy(), samples)
        return submit(task, delta, samples)

    agent.secagg.submit = recording


def _crash_at(agent: DeviceAgent, stage: str) -> None:
    """The device vanishes (TCP close, no goodbye) when the coordinator sends it `stage`."""
    handle = agent.secagg.handle

    def crashing(message):
        if message.stage == stage:
            agent.link.close(abrupt=True)
            return 1  # ends the agent's loop (max_rounds=1)
        return handle(message)

    agent.secagg.handle = crashing


def _one_round(coordinator: Coordinator, agents: list[DeviceAgent]) -> dict:
    """Connect everyone, run the coordinator's one round with each agent on its own thread, close all."""
    coordinator.connect()
    threads = []
    for agent in agents:
        agent.start()
        threads.append(threading.Thread(target=agent.run, kwargs={"max_rounds": 1, "stop_after_s": 120},
                                        daemon=True))
        threads[-1].start()
    assert coordinator.wait_for_devices() == len(agents)
    (record,) = coordinator.run()
    for t in threads:
        t.join(timeout=30)
    for agent in agents:
        agent.close()
    coordinator.link.close()
    return record


def test_secure_round_survives_dropouts_and_matches_fedavg(mosquitto_broker, tmp_path, tmp_path_factory):
    # Prepare: 5 devices with different amounts of data; dev4 vanishes after sharing its keys (before
    # masking), dev3 after sending its masked update (before the unmasking)
    host, port = mosquitto_broker
    url = f"mqtt://{host}:{port}"
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest = read_manifest(folder)
    agents, seen = [], {}
    for i in range(5):
        texts, labels = keyword_dataset(16 + 8 * i, seed=300 + i)
        agents.append(_agent(url, f"dev{i}", folder, write_csv(tmp_path / f"dev{i}.csv", texts, labels)))
        _record_inputs(agents[-1], seen)
    _crash_at(agents[4], "ciphertexts")
    _crash_at(agents[3], "survivors")
    initial = agents[0].runtime.get_flat()
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, steps=3, batch=8, lr=5e-2, deadline_s=60,
                               wait_devices=5, wait_devices_s=20, prefix=PREFIX, run_id="sa-run",
                               secure_aggregation=True)
    coordinator = Coordinator(Link.coordinator(MqttConnection(url, "edgeftl-sa-coord"), PREFIX), folder, manifest,
                              initial, config)
    # Execute
    record = _one_round(coordinator, agents)
    # Assert: the four masked updates (dev3's included) were aggregated, dev4's was not
    report = record["secure_aggregation"]
    assert report["error"] is None and (report["advertised"], report["shared"]) == (5, 5), report
    assert (report["masked"], report["unmasked"], report["threshold"]) == (4, 3, 3), report
    assert record["aggregated"] and record["updates_received"] == 4 and record["updates_rejected"] == 0
    survivors = [f"dev{i}" for i in range(4)]
    fixed = FixedPoint(max_devices=5)
    weights = {d: fixed.weight(seen[d][1]) for d in survivors}
    clipped = {d: np.clip(seen[d][0].astype(np.float64), -fixed.clip, fixed.clip) for d in survivors}
    expected = sum(weights[d] * clipped[d] for d in survivors) / sum(weights.values())
    assert report["total_weight"] == sum(weights.values()) == 16 + 24 + 32 + 40
    got = coordinator.params.astype(np.float64) - initial
    assert np.abs(expected).max() > 1e-3  # training moved the parameters
    np.testing.assert_allclose(got, expected, rtol=0, atol=report["max_error"] + 1e-6)


def test_signed_secure_round_checks_every_roster_key_against_the_peers(mosquitto_broker, tmp_path, tmp_path_factory):
    # Prepare: every message signed (the coordinator's key trusted by the devices, the devices' keys
    # on the coordinator's allowlist), and each device given the allowlist as its --peers, so the
    # key advertisements of a secure round are signed and checked by every device
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeftl.device.protocol.auth import COORDINATOR, Keys, public_key_text

    host, port = mosquitto_broker
    url = f"mqtt://{host}:{port}"
    folder = bundle(tmp_path_factory, "bert-int8")
    names = ["dev0", "dev1", "dev2"]
    signing = {name: Ed25519PrivateKey.generate() for name in [*names, COORDINATOR]}
    peers = tmp_path / "allowlist.json"
    peers.write_text(json.dumps({n: public_key_text(signing[n]) for n in names}))
    allowlist = {n: signing[n].public_key() for n in names}
    agents, checked = [], []
    for i, name in enumerate(names):
        texts, labels = keyword_dataset(16, seed=400 + i)
        keys = Keys(signing[name], {COORDINATOR: signing[COORDINATOR].public_key()})
        link = Link.device(MqttConnection(url, device_client_id(name)), SIGNED_PREFIX, name, keys=keys)
        agent = DeviceAgent(link, AgentConfig(name, folder, write_csv(tmp_path / f"{name}.csv", texts, labels),
                                              threads=1, secure_aggregation=True, peers=peers))
        verify = agent.secagg.verify
        agent.secagg.verify = lambda device, data, sig, verify=verify: checked.append(device) or verify(device, data,
                                                                                                         sig)
        agents.append(agent)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, steps=2, batch=8, lr=5e-2, deadline_s=60,
                               wait_devices=3, wait_devices_s=20, prefix=SIGNED_PREFIX, run_id="sa-signed",
                               secure_aggregation=True)
    coordinator_link = Link.coordinator(MqttConnection(url, "edgeftl-sa-coord2"), SIGNED_PREFIX,
                                        keys=Keys(signing[COORDINATOR], allowlist))
    coordinator = Coordinator(coordinator_link, folder, read_manifest(folder), agents[0].runtime.get_flat(), config)
    # Execute
    record = _one_round(coordinator, agents)
    # Assert: the round aggregated all three, and every device checked every roster entry's signature
    report = record["secure_aggregation"]
    assert report["error"] is None and record["aggregated"] and record["updates_received"] == 3, report
    assert record["updates_rejected"] == 0, record["rejected_reasons"]
    assert sorted(set(checked)) == names and len(checked) >= 3 * 3
