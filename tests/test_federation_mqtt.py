"""Federation through real Mosquitto: hostile updates are rejected and counted, never crash."""

from __future__ import annotations

import threading

import numpy as np

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.link import Framer, Link, MqttConnection
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.manifest import bundle_sha256, read_manifest
from edgeftl.device.protocol.messages import Update, encode
from edgeftl.device.protocol.topics import Topics
from edgeftl.device.runtime import BundleRuntime

from fixtures_build import bundle


def _update(run_id: str, sha: str, device: str, round_index: int, size: int, values: np.ndarray, seq: int = 1) -> bytes:
    vector = Encoded("none", size, {"values": values.astype(np.float32)})
    return encode(Update(run_id, round_index, sha, device, 10, seq, vector))


def test_every_kind_of_bad_update_is_rejected_and_counted(mosquitto_broker, tmp_path, tmp_path_factory):
    # Prepare: a coordinator on real Mosquitto, two "online" devices; dev0 is played by a rogue client
    # that publishes raw frames (chunked by a framer that allows anything)
    host, port = mosquitto_broker
    url = f"mqtt://{host}:{port}"
    folder = bundle(tmp_path_factory, "bert-int8")
    manifest, sha = read_manifest(folder), bundle_sha256(folder)
    n = manifest.trainable_count
    # A prefix of its own: the statuses this test fakes stay retained on the session's broker, and under
    # the default prefix a later simulation counted them as its devices (and sampled them, not its own)
    prefix = "bad-updates"
    topics = Topics(prefix)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, deadline_s=15, wait_devices=2, wait_devices_s=10,
                               run_id="r1", prefix=prefix)
    link = Link.coordinator(MqttConnection(url, "coord"), prefix, max_chunk=64 * 1024,
                            max_message_bytes=256 * 1024)
    coordinator = Coordinator(link, folder, manifest, BundleRuntime(folder).get_flat(), config)
    rogue, framer = MqttConnection(url, "rogue"), Framer(64 * 1024, 64 * 1024 * 1024)
    task_seen = threading.Event()
    rogue.on_frame = lambda topic, frame: task_seen.set() if topic == topics.task else None
    rogue.subscribe([topics.task])
    rogue.connect()

    def publish(topic: str, payload: bytes, retain: bool = False) -> None:
        for frame_topic, frame in framer.frames(topic, payload, retain):
            rogue.send(frame_topic, frame, 1, retain)

    for device in ("dev0", "dev1"):
        publish(topics.status(device), b"online", retain=True)
    coordinator.connect()
    assert coordinator.wait_for_devices() == 2
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(coordinator.run_round(0)))
    runner.start()
    assert task_seen.wait(10)
    good = np.full(n, 0.01, np.float32)
    bad = np.full(n, 0.01, np.float32)
    bad[3] = np.nan
    valid = _update("r1", sha, "dev0", 0, n, good)
    # Execute: the hostile traffic, then a valid update and its duplicate
    publish(topics.update("dev0"), b"garbage, not a message")  # malformed
    publish(topics.update("dev0"), valid[:-100])  # truncated
    publish(topics.update("dev0"), _update("r1", sha, "dev0", 0, 200_000, np.zeros(200_000)))  # oversized
    publish(topics.update("dev0"), _update("r1", sha, "dev0", 0, n + 1, np.zeros(n + 1)))  # wrong shape
    publish(topics.update("dev0"), _update("r1", sha, "dev0", 0, n, bad, seq=5))  # NaN
    publish(topics.update("dev0"), _update("r1", sha, "dev0", 7, n, good, seq=6))  # stale / wrong round
    publish(topics.update("intruder"), _update("r1", sha, "intruder", 0, n, good))  # unknown device
    publish(topics.update("dev0"), valid)
    publish(topics.update("dev0"), valid)  # a redelivery: dropped quietly
    publish(topics.update("dev1"), _update("r1", sha, "dev0", 0, n, good, seq=9))  # claims another device's id
    runner.join(30)
    rogue.close()
    link.close()
    # Assert: one update aggregated, everything else counted, the coordinator still standing
    record = result
    assert record["updates_received"] == 1 and record["aggregated"]
    assert record["updates_late"] == 1
    reasons = record["rejected_reasons"]
    assert record["updates_rejected"] == 7, reasons
    assert set(reasons) == {"bad magic", "truncated message", "oversized message", "wrong size", "not finite",
                            "unknown device", "device id mismatch"}, reasons
    assert record["updates_redelivered"] == 1
    np.testing.assert_allclose(coordinator.params, BundleRuntime(folder, verify=False).get_flat() + good, rtol=1e-6)
