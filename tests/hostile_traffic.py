"""Generated hostile traffic for the coordinator: every single-frame attack the issue 12 review
tried, as (topic, payload) pairs from a seeded generator.

Each frame is built to be refused (or counted as late) by the coordinator, never accepted: the
test counts them against the round records. Valid-looking messages from a sampled device are
not generated here; the test sends those itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.messages import ErrorReply, Global, Task, Update, encode
from edgeftl.device.protocol.topics import Topics


@dataclass
class Target:
    """What the attacker knows of the federation (an open broker shows all of it)."""

    run_id: str
    bundle_sha256: str
    size: int
    senders: list[str]  # the device ids (topics) the attacker publishes from
    honest: list[str]  # device ids it names in headers to impersonate
    round: Callable[[], int]  # the round in progress, as last seen on the task topic


def update(t: Target, device: str, round_index: int, values: np.ndarray, samples: int = 10, seq: int = 10**6,
           metrics: dict | None = None) -> bytes:
    vector = Encoded("none", values.size, {"values": values.astype(np.float32)})
    return encode(Update(t.run_id, round_index, t.bundle_sha256, device, samples, seq, vector, metrics or {}))


def reheader(payload: bytes, **changes: object) -> bytes:
    """A valid message with header fields replaced, its body hash kept valid."""
    header, arrays = wire.decode_message(payload, 1 << 30)
    header.update(changes)
    return wire.encode_message(header, dict(arrays))


def frames(t: Target, count: int, seed: int) -> Iterator[tuple[str, bytes, str]]:
    """`count` hostile frames: (topic, payload, attack name), cycling through ATTACKS."""
    rng = np.random.default_rng(seed)
    topics = Topics("edgeftl")
    for i in range(count):
        name, make = ATTACKS[i % len(ATTACKS)]
        device = t.senders[int(rng.integers(len(t.senders)))]
        place, payload = make(t, rng, device)
        place, _, sender = place.partition(":")  # "update:<id>": on that device's own topic
        sender = sender or device
        yield (topics.status(sender) if place == "status" else topics.update(sender)), payload, name


def _valid(t: Target, rng: np.random.Generator, device: str) -> bytes:
    return update(t, device, t.round(), rng.normal(0, 0.01, t.size), seq=int(rng.integers(10**6, 10**9)))


def _random_bytes(t, rng, device):
    return "update", rng.bytes(int(rng.integers(1, 4000)))


def _truncated(t, rng, device):
    whole = _valid(t, rng, device)
    return "update", whole[: int(rng.integers(1, len(whole) - 1))]


def _length_lie(t, rng, device):
    whole = _valid(t, rng, device)
    lie = int(rng.choice([len(whole), 1 << 20, (1 << 32) - 1]))
    return "update", wire.PREFIX.pack(wire.MAGIC, 1, lie) + whole[wire.PREFIX.size:]


def _flipped_body(t, rng, device):
    """One body byte changed in transit: the body hash no longer matches."""
    whole = bytearray(_valid(t, rng, device))
    whole[-1 - int(rng.integers(4 * t.size))] ^= 0xFF
    return "update", bytes(whole)


def _huge_header(t, rng, device):
    """A header far above the device-message limit: refused before it is parsed."""
    return "update", reheader(_valid(t, rng, device), padding="x" * int(rng.integers(20_000, 200_000)))


def _deep_header(t, rng, device):
    depth = int(rng.integers(500, 5000))
    text = ('{"kind":' + "[" * depth + "]" * depth + "}").encode()
    return "update", wire.PREFIX.pack(wire.MAGIC, 1, len(text)) + text


def _wrong_run(t, rng, device):
    return "update", reheader(_valid(t, rng, device), run_id="run-of-the-attacker")


def _wrong_bundle(t, rng, device):
    return "update", reheader(_valid(t, rng, device), bundle_sha256="0" * 64)


def _other_round(t, rng, device):
    """A valid update for a round that is not open: counted late."""
    return "update", update(t, device, max(0, t.round() - 1) + 10_000, rng.normal(0, 0.01, t.size))


def _unknown_device(t, rng, device):
    name = f"intruder{int(rng.integers(10**6))}"
    return "update:" + name, update(t, name, t.round(), rng.normal(0, 0.01, t.size))


def _huge_samples(t, rng, device):
    return "update", reheader(_valid(t, rng, device), samples=10**400)


def _huge_seq(t, rng, device):
    return "update", reheader(_valid(t, rng, device), seq=2**60)


def _metric_string_with_unit(t, rng, device):
    key = str(rng.choice(["bytes_down", "peak_rss_mib", "train_time_s"]))
    return "update", reheader(_valid(t, rng, device), metrics={key: "a lot"})


def _metric_huge_int(t, rng, device):
    return "update", reheader(_valid(t, rng, device), metrics={"samples": 10**400})


def _metric_flood(t, rng, device):
    return "update", reheader(_valid(t, rng, device), metrics={f"m{i}": "x" * 250 for i in range(64)})


def _metric_list(t, rng, device):
    return "update", reheader(_valid(t, rng, device), metrics={"peak_rss_mib": [1, 2, 3]})


def _nan(t, rng, device):
    values = rng.normal(0, 0.01, t.size)
    values[int(rng.integers(t.size))] = float(rng.choice([np.nan, np.inf, -np.inf]))
    return "update", update(t, device, t.round(), values)


def _wrong_size(t, rng, device):
    return "update", update(t, device, t.round(), rng.normal(0, 0.01, t.size + int(rng.integers(1, 50))))


def _task_on_update_topic(t, rng, device):
    return "update", encode(Task(t.run_id, t.round(), t.bundle_sha256, (device,), 5.0, 0.1, "none", steps=10**6))


def _global_on_update_topic(t, rng, device):
    vector = Encoded("none", t.size, {"values": np.zeros(t.size, np.float32)})
    return "update", encode(Global(t.run_id, t.round(), t.bundle_sha256, vector))


def _kind_mismatch(t, rng, device):
    """An update whose header says it is a task: the kind must match the topic's message type."""
    return "update", reheader(_valid(t, rng, device), kind="task")


def _unknown_kind(t, rng, device):
    return "update", reheader(_valid(t, rng, device), kind=str(rng.choice(["ping", "admin", "shell"])))


def _spoofed_sender(t, rng, device):
    """An update naming another device than its topic does."""
    other = t.honest[int(rng.integers(len(t.honest)))]
    return "update", update(t, other, t.round(), rng.normal(0, 0.01, t.size))


def _error_for_another_run(t, rng, device):
    return "update", encode(ErrorReply("another-run", t.round(), t.bundle_sha256, device, "train_failed", "no"))


def _bad_error_code(t, rng, device):
    reply = encode(ErrorReply(t.run_id, t.round(), t.bundle_sha256, device, "train_failed", "x"))
    return "update", reheader(reply, code="DROP TABLE")


def _bad_status(t, rng, device):
    texts = [b"maybe", b"ONLINE", b"online\n", b"\x00" * 7, json.dumps([1]).encode()]
    return "status", texts[int(rng.integers(len(texts)))]  # (numpy's choice would strip the NULs)


def _status_of_another(t, rng, device):
    text = json.dumps({"kind": "status", "format": 1, "device_id": "someone-else", "state": "online"}).encode()
    return "status", wire.encode_message(json.loads(text), {})


def _compact(raw: bytes) -> bytes:
    return wire.PREFIX.pack(wire.MAGIC, wire.COMPACT_VERSION, len(raw)) + raw


def _compact_bomb(t, rng, device):
    """A version-2 (PROTOCOL 4.2) header of a few KiB that inflates to megabytes: refused at the
    reader's 16 KiB header limit, before it is inflated further."""
    text = b'{"kind":"update","pad":"' + b"a" * int(rng.integers(100_000, 1_000_000)) + b'"}'
    return "update", _compact(wire.deflate_header(text))


def _compact_garbage(t, rng, device):
    """Version 2 with a header that is no DEFLATE stream (or not one that ends where it says)."""
    return "update", _compact(rng.bytes(int(rng.integers(1, 2000))))


def _compact_wrong_run(t, rng, device):
    """A well-formed version-2 update, for another run: refused by the same field checks as version 1."""
    header, arrays = wire.decode_message(_valid(t, rng, device), 1 << 30)
    header["run_id"] = "run-of-the-attacker"
    return "update", wire.encode_message(header, dict(arrays), version=wire.COMPACT_VERSION)


ATTACKS: list[tuple[str, Callable]] = [(f.__name__.strip("_"), f) for f in (
    _random_bytes, _truncated, _length_lie, _flipped_body, _huge_header, _deep_header, _wrong_run, _wrong_bundle,
    _other_round,
    _unknown_device, _huge_samples, _huge_seq, _metric_string_with_unit, _metric_huge_int, _metric_flood,
    _metric_list, _nan, _wrong_size, _task_on_update_topic, _global_on_update_topic, _kind_mismatch,
    _unknown_kind, _spoofed_sender, _error_for_another_run, _bad_error_code, _bad_status, _status_of_another,
    _compact_bomb, _compact_garbage, _compact_wrong_run)]
