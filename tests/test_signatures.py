"""Signed messages (protocol/auth.py) through links on the in-process broker: what is signed
arrives, what is unsigned, forged, signed by another key or from a device off the allowlist is
refused as it arrives; an unsigned federation keeps working. Real Mosquitto: test_security.py."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeftl.device.link import Incoming, InProcessBroker, InProcessConnection, Link, Refused
from edgeftl.device.protocol import auth, wire
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.manifest import BundleError, Manifest
from edgeftl.device.protocol.messages import ErrorReply, Global, Status, Task, Update, decode, encode

SHA = "cd" * 32
COORDINATOR_KEY, DEV1_KEY, DEV2_KEY, ROGUE_KEY = (Ed25519PrivateKey.generate() for _ in range(4))


def task(steps: int = 1) -> Task:
    return Task("r1", 0, SHA, ("dev-1",), 60.0, 0.01, "none", steps=steps)


def delta_global(value: float = 0.5) -> Global:
    return Global("r1", 0, SHA, Encoded("none", 4, {"values": np.full(4, value, np.float32)}), base_round=-1)


def update(device: str = "dev-1") -> Update:
    return Update("r1", 0, SHA, device, 10, 1, Encoded("none", 4, {"values": np.ones(4, np.float32)}), {})


def coordinator_keys() -> auth.Keys:
    return auth.Keys(COORDINATOR_KEY, {"dev-1": DEV1_KEY.public_key(), "dev-2": DEV2_KEY.public_key()})


def device_keys(key: Ed25519PrivateKey = DEV1_KEY) -> auth.Keys:
    return auth.Keys(key, {auth.COORDINATOR: COORDINATOR_KEY.public_key()})


def take(link: Link, count: int) -> list[Incoming | Refused]:
    items: list[Incoming | Refused] = []
    end = time.monotonic() + 5.0
    while len(items) < count and time.monotonic() < end:
        item = link.receive(0.05)
        if item is not None:
            items.append(item)
    assert len(items) == count, items
    return items


def pair(broker: InProcessBroker, coordinator: auth.Keys | None, device: auth.Keys | None,
         device_id: str = "dev-1") -> tuple[Link, Link]:
    c = Link.coordinator(InProcessConnection(broker, "coord"), "fl", keys=coordinator)
    d = Link.device(InProcessConnection(broker, device_id), "fl", device_id, keys=device)
    c.connect()
    d.connect()
    return c, d


def reasons(items: list[Incoming | Refused]) -> list[str]:
    return [item.reason if isinstance(item, Refused) else type(item.message).__name__ for item in items]


def test_signed_messages_travel_both_ways_and_statuses_are_signed_too() -> None:
    coordinator, device = pair(InProcessBroker(), coordinator_keys(), device_keys())
    coordinator.send(task())
    coordinator.send(delta_global())
    device.send(update())
    device.send(ErrorReply("r1", 0, SHA, "dev-1", "train_failed", "boom"))
    assert reasons(take(device, 2)) == ["Task", "Global"]
    got = take(coordinator, 3)
    assert reasons(got) == ["Status", "Update", "ErrorReply"]
    assert isinstance(got[0], Incoming) and got[0].message == Status("dev-1", True)


def test_a_forged_task_or_global_is_refused_by_a_device_that_pins_the_coordinator_key() -> None:
    broker = InProcessBroker()
    _, device = pair(broker, None, device_keys())
    forger = Link.coordinator(InProcessConnection(broker, "forger"), "fl", keys=auth.Keys(ROGUE_KEY))
    unsigned = Link.coordinator(InProcessConnection(broker, "unsigned"), "fl")
    for link in (forger, unsigned):
        link.connect()
        link.send(task(steps=100_000))
        link.send(delta_global(1e6))
    assert reasons(take(device, 4)) == [
        "bad signature: task not signed with the key of the coordinator",
        "bad signature: global not signed with the key of the coordinator",
        "bad signature: unsigned task from the coordinator", "bad signature: unsigned global from the coordinator"]


def test_the_coordinator_refuses_updates_signed_by_another_device_unsigned_or_off_the_allowlist() -> None:
    broker = InProcessBroker()
    coordinator, _ = pair(broker, coordinator_keys(), device_keys())
    assert reasons(take(coordinator, 1)) == ["Status"]
    impostor = Link.device(InProcessConnection(broker, "imp"), "fl", "dev-1", keys=device_keys(DEV2_KEY))
    stranger = Link.device(InProcessConnection(broker, "str"), "fl", "dev-9", keys=device_keys(ROGUE_KEY))
    plain = Link.device(InProcessConnection(broker, "plain"), "fl", "dev-2")
    for link, device in ((impostor, "dev-1"), (stranger, "dev-9"), (plain, "dev-2")):
        link.connect()
        link.send(update(device))
        if link is impostor:  # a spoofed error reply would void dev-1's round
            link.send(ErrorReply("r1", 0, SHA, "dev-1", "train_failed", "spoofed"))
    got = reasons(take(coordinator, 7))
    assert got == ["bad signature: status not signed with the key of device 'dev-1'",
                   "bad signature: update not signed with the key of device 'dev-1'",
                   "bad signature: error not signed with the key of device 'dev-1'",
                   "unknown device: 'dev-9' is not on the allowlist", "unknown device: 'dev-9' is not on the allowlist",
                   "bad signature: unsigned status from device 'dev-2'",
                   "bad signature: unsigned update from device 'dev-2'"]


def test_a_flipped_byte_anywhere_fails_the_signature_and_the_trailer_is_declared_in_the_header() -> None:
    keys = device_keys()
    payload = keys.sign(update())
    header, _ = wire.decode_message(payload, 1 << 20)
    assert header["sig"] == "ed25519" and len(payload) == len(encode(update(), "ed25519")) + 64
    assert isinstance(decode(payload, 1 << 20), Update)  # a reader without keys skips the trailer
    checker = coordinator_keys()
    checker.check(payload, decode(payload, 1 << 20))
    for index in (5, len(payload) - 70, len(payload) - 1):  # header length, body, signature
        forged = bytearray(payload)
        forged[index] ^= 1
        with pytest.raises(ValueError, match=r"bad signature|bad header|bad hash|truncated|bad array"):
            checker.check(bytes(forged), decode(bytes(forged), 1 << 20))


def test_an_unsigned_federation_keeps_working_and_ignores_signatures_it_cannot_check() -> None:
    coordinator, device = pair(InProcessBroker(), None, auth.Keys(DEV1_KEY))
    coordinator.send(task())
    device.send(update())
    assert reasons(take(device, 1)) == ["Task"]
    assert reasons(take(coordinator, 2)) == ["Status", "Update"]


def test_allowlists_and_key_texts_are_checked(tmp_path: Path) -> None:
    text = auth.public_key_text(DEV1_KEY)
    assert auth.public_key_text(auth.parse_public_key(text, "x")) == text
    path = tmp_path / "allow.json"
    path.write_text(json.dumps({"dev-1": text}))
    assert list(auth.read_allowlist(path)) == ["dev-1"]
    for bad, match in (({"dev 1": text}, "not a device id"), ({"dev-1": "rsa:abc"}, "must be a public key"),
                       ({"dev-1": "ed25519:AAAA"}, "32 bytes"), ([], "non-empty JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            auth.read_allowlist(path)
    pem = tmp_path / "k.pem"
    pem.write_bytes(auth.private_key_pem(DEV1_KEY))
    assert auth.public_key_text(auth.load_private_key(pem)) == text
    pem.write_text("nope")
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        auth.load_private_key(pem)



# ---- the signed conformance vectors (docs/conformance/vectors.json, "signed") -----------------

SIGNED_VECTORS = json.loads((Path(__file__).resolve().parent.parent / "docs/conformance/vectors.json").read_text())
SIGNED = SIGNED_VECTORS["signed"]


@pytest.mark.parametrize("case", SIGNED, ids=[c["name"] for c in SIGNED])
def test_signed_vector_verifies_or_is_refused_as_recorded(case: dict) -> None:
    payload = bytes.fromhex(case["hex"])
    message = decode(payload, 1 << 20)
    keys = auth.Keys(trusted={case["signer"]: auth.parse_public_key(case["public_key"], "case")})
    if case["valid"]:
        keys.check(payload, message)
        seed = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(case["signing_seed_hex"]))
        assert auth.Keys(seed).sign(message, payload[4]) == payload  # Ed25519 is deterministic: same key, same bytes
    else:
        with pytest.raises(ValueError) as caught:
            keys.check(payload, message)
        assert str(caught.value) == case["reason"]


# ---- the pinned coordinator key ----------------------------------------------------------------


def test_a_pinned_key_round_trips_through_the_manifest_and_unpinned_bytes_do_not_change(tmp_path: Path) -> None:
    text = SIGNED_VECTORS["bundle"]["manifest_json"]
    manifest = Manifest.from_dict(json.loads(text))
    assert manifest.coordinator_key is None and manifest.to_json() == text  # old bundles keep their hash
    pinned = replace(manifest, coordinator_key=auth.public_key_text(COORDINATOR_KEY))
    assert Manifest.from_dict(json.loads(pinned.to_json())).coordinator_key == auth.public_key_text(COORDINATOR_KEY)
    with pytest.raises(BundleError, match="coordinator_key"):
        replace(manifest, coordinator_key="ed25519:short")


def test_the_coordinator_refuses_to_start_without_the_key_its_bundle_pins(tmp_path: Path) -> None:
    pem = tmp_path / "other.pem"
    pem.write_bytes(auth.private_key_pem(ROGUE_KEY))
    pinned = auth.public_key_text(COORDINATOR_KEY)
    with pytest.raises(ValueError, match=r"pass --signing-key with its private key$"):
        auth.coordinator_keys(None, None, pinned)
    with pytest.raises(ValueError, match="not another one"):
        auth.coordinator_keys(pem, None, pinned)
    keys = auth.device_keys(None, pinned)
    assert keys.signing is None and keys.trusted is not None and list(keys.trusted) == [auth.COORDINATOR]


def test_a_header_declaring_an_unknown_algorithm_or_a_missing_trailer_is_refused() -> None:
    signed = encode(task(), "ed25519") + bytes(64)
    other = signed.replace(b'"sig":"ed25519"', b'"sig":"ed448\x20\x20"')  # same length, another name
    with pytest.raises(wire.WireError, match="unknown signature algorithm 'ed448  '"):
        wire.decode_message(other, 1 << 20)
    with pytest.raises(wire.WireError, match="truncated message"):  # declares ed25519, carries no trailer
        wire.decode_message(encode(task(), "ed25519"), 1 << 20)
