"""The conformance vectors (docs/conformance/vectors.json) against the reference code, both ways.

Bytes decode to the recorded form and the recorded form encodes to the same bytes; chunks split
and reassemble as recorded; deltas apply bit for bit; codecs encode and decode as recorded;
every refusal is refused with its reason, placements through a real in-process link. And the
file is exactly what tools/make_conformance.py makes now, so the code and the vectors never drift.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeftl.device.link import InProcessBroker, InProcessConnection, Link, Refused
from edgeftl.device.link.link import Incoming
from edgeftl.device.protocol import chunks, messages, wire
from edgeftl.device.protocol.codecs import Encoded, parse_codec
from edgeftl.device.protocol.manifest import Manifest
from edgeftl.device.protocol.messages import ErrorReply, Global, Message, Status, Task, Update
from edgeftl.device.protocol.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
VECTORS_FILE = ROOT / "docs" / "conformance" / "vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
MAX_BYTES: int = VECTORS["max_bytes"]
SIZE: int = VECTORS["bundle"]["size"]


def cases(section: str, where: Any = None) -> Any:
    chosen = [c for c in VECTORS[section] if where is None or where(c)]
    return pytest.mark.parametrize("case", chosen, ids=[c["name"] for c in chosen])


def vector_of_form(form: dict) -> np.ndarray:
    """A recorded float32 vector: its hex bytes, or +0.0 but at the listed positions."""
    if "hex" in form:
        return np.frombuffer(bytes.fromhex(form["hex"]), dtype="<f4")
    vector = np.zeros(form["size"], dtype="<f4")
    for index, value in form["nonzero"]:
        vector[index] = np.frombuffer(bytes.fromhex(value), dtype="<f4")[0]
    return vector


def arrays_of(forms: list[dict]) -> dict[str, np.ndarray]:
    return {a["name"]: np.frombuffer(bytes.fromhex(a["hex"]), dtype=a["dtype"]).reshape(a["shape"]) for a in forms}


def assert_same_arrays(got: dict[str, np.ndarray], forms: list[dict]) -> None:
    assert list(got) == [a["name"] for a in forms]
    for form in forms:
        array = np.asarray(got[form["name"]])
        assert (array.dtype.str, list(array.shape)) == (form["dtype"], form["shape"]), form["name"]
        assert array.astype(form["dtype"]).tobytes().hex() == form["hex"], form["name"]
        assert [float(x) if array.dtype.kind == "f" else int(x) for x in array.reshape(-1)] == form["values"]


def bits(vector: np.ndarray) -> str:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes().hex()


def typed(case: dict) -> Message:
    """The typed message a recorded decoded form describes."""
    h = case["header"]
    if h["kind"] == "status":
        return Status(h["device_id"], h["state"] == "online", h.get("info", {}))
    if h["kind"] == "task":
        return Task(h["run_id"], h["round"], h["bundle_sha256"], tuple(h["devices"]), float(h["deadline_s"]),
                    float(h["lr"]), h["codec"], h.get("epochs"), h.get("steps"), h["batch"], h.get("mode", "sync"),
                    h.get("start_sha256"), h.get("framing", 1))
    if h["kind"] == "error":
        return ErrorReply(h["run_id"], h["round"], h["bundle_sha256"], h["device_id"], h["code"], h["reason"])
    vector = Encoded(h["codec"], h["size"], arrays_of(case["arrays"]))
    if h["kind"] == "global":
        return Global(h["run_id"], h["round"], h["bundle_sha256"], vector, h.get("base_round"), h.get("params_sha256"))
    return Update(h["run_id"], h["round"], h["bundle_sha256"], h["device_id"], h["samples"], h["seq"], vector,
                  h["metrics"])


# ---- the file is the code's ------------------------------------------------------------------


def test_vectors_are_exactly_what_the_generator_makes() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_conformance  # tools/ is not a package

    assert make_conformance.render() == VECTORS_FILE.read_text(encoding="utf-8"), \
        "run `python tools/make_conformance.py` and commit docs/conformance/vectors.json"


def test_every_section_has_cases() -> None:
    counts = {key: len(value) for key, value in VECTORS.items() if isinstance(value, list)}
    assert min(counts.values()) >= 2, counts
    assert {c["stage"] for c in VECTORS["refusals"]} == {"message", "vector", "chunks", "status", "place"}


# ---- the bundle -------------------------------------------------------------------------------


def test_bundle_identity_and_trainable_layout() -> None:
    bundle = VECTORS["bundle"]
    manifest = Manifest.from_dict(json.loads(bundle["manifest_json"]))

    assert hashlib.sha256(bundle["manifest_json"].encode()).hexdigest() == bundle["bundle_sha256"]
    assert manifest.trainable_count == bundle["size"]
    offset = 0
    for entry, param in zip(bundle["trainable"], manifest.trainable, strict=True):
        assert (entry["name"], entry["shape"], entry["offset"], entry["size"]) == (
            param.name, param.shape, param.offset, param.size)
        assert entry["offset"] == offset  # in elements, back to back, in list order
        offset += entry["size"]
    assert offset == bundle["size"]


# ---- messages ---------------------------------------------------------------------------------


@cases("messages")
def test_message_decodes_to_its_form(case: dict) -> None:
    payload = bytes.fromhex(case["hex"])

    header, arrays = wire.decode_message(payload, MAX_BYTES)
    message = messages.decode(payload, MAX_BYTES)

    assert header == case["header"]
    assert_same_arrays(arrays, case["arrays"])
    expected = typed(case)
    assert messages.kind_of(message) == case["header"]["kind"]
    for name in message.__dataclass_fields__:
        if name != "vector":
            assert getattr(message, name) == getattr(expected, name), name
    if isinstance(message, (Global, Update)):
        assert (message.vector.codec, message.vector.size) == (parse_codec(case["header"]["codec"]).spec, SIZE)
        assert_same_arrays(message.vector.arrays, case["arrays"])
        assert bits(messages.vector_of(message, SIZE)) == case["vector"]["hex"]


@cases("messages", lambda c: c["canonical"])
def test_message_form_encodes_to_its_bytes(case: dict) -> None:
    assert messages.encode(typed(case), version=case["version"]).hex() == case["hex"]


@cases("status_text")
def test_status_text(case: dict) -> None:
    status = messages.status_from_payload(bytes.fromhex(case["hex"]), case["device_id"], MAX_BYTES)

    assert status == Status(case["device_id"], case["online"])
    assert messages.status_payload(status).hex() == case["hex"]


# ---- what may arrive where: through a real link ------------------------------------------------


def arrive(place: str, device: str | None, payload: bytes) -> Incoming | Refused | None:
    """Publish raw bytes on a place's topic; what the link of the role that reads it delivers."""
    broker, topics = InProcessBroker(), Topics(VECTORS["prefix"])
    if place in ("task", "global", "delta"):
        link = Link.device(InProcessConnection(broker, "edgeftl-reader"), topics.prefix, "reader")
        link.follow_full_global(place == "global")
    else:
        link = Link.coordinator(InProcessConnection(broker, "eftl-c-reader"), topics.prefix)
    link.connect(1.0)
    sender = InProcessConnection(broker, "sender")
    sender.connect(1.0)
    topic = {"task": topics.task, "global": topics.global_params, "delta": topics.global_delta}.get(place) or (
        topics.update(str(device)) if place == "update" else topics.status(str(device)))
    sender.send(topic, payload, 1, False)
    return link.receive(timeout_s=1.0)


@cases("messages")
def test_message_arrives_on_its_place(case: dict) -> None:
    item = arrive(case["place"], case["header"].get("device_id"), bytes.fromhex(case["hex"]))

    assert isinstance(item, Incoming), item
    assert messages.encode(item.message) == messages.encode(messages.decode(bytes.fromhex(case["hex"]), MAX_BYTES))


@cases("status_text")
def test_status_text_arrives_on_the_status_topic(case: dict) -> None:
    item = arrive("status", case["device_id"], bytes.fromhex(case["hex"]))

    assert isinstance(item, Incoming) and item.message == Status(case["device_id"], case["online"])


@cases("refusals", lambda c: c["stage"] == "place")
def test_misplaced_message_is_refused_by_the_link(case: dict) -> None:
    item = arrive(case["place"], case["device_id"], bytes.fromhex(case["hex"]))

    assert isinstance(item, Refused), item
    assert item.reason.split(":")[0] == case["reason"], item.reason


# ---- chunks -----------------------------------------------------------------------------------


@cases("chunked")
def test_chunks_split_and_reassemble_as_recorded(case: dict) -> None:
    payload = bytes.fromhex(case["payload_hex"])
    frames = [bytes.fromhex(f["hex"]) for f in case["frames"]]

    assert chunks.split(payload, case["max_chunk"], case["message_id"]) == frames
    assert all(len(f) <= case["max_chunk"] for f in frames)
    assert [f["topic"] for f in case["frames"]] == [f"{case['topic']}/_c/{i}" for i in range(len(frames))]
    for order in (frames, frames[::-1]):  # slices are placed by their index, not by arrival
        reassembler = chunks.Reassembler(MAX_BYTES)
        results = [reassembler.add(case["topic"], f) for f in order]
        assert results[-1] == payload and all(r is None for r in results[:-1])
    wire.decode_message(payload, MAX_BYTES)  # a message, by layout (the first is the spec's example)


# ---- deltas -----------------------------------------------------------------------------------


@cases("deltas")
def test_delta_applies_bit_for_bit(case: dict) -> None:
    reference = vector_of_form(case["reference"])
    message = messages.decode(bytes.fromhex(case["message_hex"]), MAX_BYTES)
    assert isinstance(message, Global) and message.base_round == message.round - 1

    delta = messages.vector_of(message, reference.size)
    result = messages.apply_delta(reference, delta)

    assert bits(delta) == case["delta"]["hex"]
    assert bits(result) == case["result"]["hex"]
    assert messages.params_sha256(result) == case["params_sha256"] == message.params_sha256
    # Rounding the decoded delta to float32 before adding matters: fused, these elements differ.
    fused = (reference.astype(np.float64) + delta.astype(np.float64)).astype(np.float32)
    assert bits(fused) == bits(result)  # adding two float32 values in float64 and rounding is exact
    assert bool(case["fused_mismatches"]) == case["codec"].split("+")[-1].startswith("int")


# ---- codecs -----------------------------------------------------------------------------------


@cases("codecs")
def test_codec_encodes_and_decodes_as_recorded(case: dict) -> None:
    codec = parse_codec(case["spec"])
    vector = vector_of_form(case["input"])
    arrays = arrays_of(case["arrays"])

    assert codec.spec == case["normalised"]
    if case["encoder"]:
        assert_same_arrays(codec.encode(vector).arrays, case["arrays"])
    decoded = codec.decode(Encoded(codec.spec, vector.size, arrays))
    assert bits(decoded) == bits(vector_of_form(case["decoded"]))


# ---- refusals ---------------------------------------------------------------------------------


def refuse(case: dict) -> Exception:
    payload = bytes.fromhex(case.get("hex", ""))
    limit = case.get("max_bytes", MAX_BYTES)
    with pytest.raises((messages.MessageError, wire.WireError)) as caught, np.errstate(over="ignore"):
        if case["stage"] == "message":
            messages.decode(payload, limit)
        elif case["stage"] == "vector":
            message = messages.decode(payload, limit)
            assert isinstance(message, (Global, Update))
            messages.vector_of(message, case["size"])
        elif case["stage"] == "status":
            messages.status_from_payload(payload, case["device_id"], limit)
        else:
            reassembler = chunks.Reassembler(limit)
            *first, last = [bytes.fromhex(f) for f in case["frames"]]
            for frame in first:
                assert reassembler.add(case["topic"], frame) is None
            reassembler.add(case["topic"], last)
    return caught.value


@cases("refusals", lambda c: c["stage"] != "place")
def test_refusal_has_its_reason(case: dict) -> None:
    error = refuse(case)

    assert str(error).split(":")[0] == case["reason"], str(error)
    assert "\n" not in str(error)
