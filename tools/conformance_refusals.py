"""The refusals of the conformance vectors: bytes every reader must refuse, with the reason.

A reason is the text before the first ':' of the error (MessageError, WireError). Stages say
which step refuses: `message` (decoding), `vector` (the vector against the bundle's length),
`chunks` (reassembly), `status` (a status topic's payload), `place` (a message on a topic where
it may not arrive). Each case is run through the reference code as it is made.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from edgeftl.device.protocol import chunks, messages, wire
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.messages import Status, Update

from conformance_cases import (
    BUNDLE,
    DEVICE,
    MAX_BYTES,
    PREFIX,
    RUN,
    N,
    chunk_cases,
    encoded,
    f32,
    header_of,
    normals,
    reason_of,
    typed_messages,
)

DROP = object()  # a header field to leave out


def reheader(payload: bytes, **changes: Any) -> bytes:
    """A valid message with header fields changed (DROP: removed), arrays and body hash kept valid."""
    header, arrays = wire.decode_message(payload, MAX_BYTES)
    header.update(changes)
    return wire.encode_message({k: v for k, v in header.items() if v is not DROP}, dict(arrays))


def raw_message(header_text: bytes, body: bytes = b"", magic: bytes = wire.MAGIC, version: int = 1) -> bytes:
    """A message with a header written by hand (for what no JSON writer emits)."""
    return wire.PREFIX.pack(magic, version, len(header_text)) + header_text + body


def compact_message(header_text: bytes, body: bytes = b"") -> bytes:
    """A version-2 message with a header written by hand."""
    return raw_message(wire.deflate_header(header_text), body, version=wire.COMPACT_VERSION)


def carrying(spec: str, size: int, arrays: dict[str, np.ndarray]) -> bytes:
    """An update whose header says `spec` and `size`, carrying these arrays (valid or not)."""
    return messages.encode(Update(RUN, 4, BUNDLE, DEVICE, 1, 1, Encoded(spec, size, arrays), {}))


def refusal(name: str, stage: str, reason: str, payload: bytes | None = None, **extra: Any) -> dict:
    case = {"name": name, "stage": stage, "reason": reason}
    if payload is not None:
        case["hex"] = payload.hex()
    case.update(extra)
    check_refusal(case)
    return case


def check_refusal(case: dict) -> None:
    """Make sure the reference code refuses the case with its reason (placement is the link's check,
    run by tests/test_conformance.py)."""
    stage, payload = case["stage"], bytes.fromhex(case.get("hex", ""))
    limit = case.get("max_bytes", MAX_BYTES)
    try:
        if stage == "message":
            messages.decode(payload, limit)
        elif stage == "vector":
            with np.errstate(over="ignore"):  # a product that overflows float32 is the refusal
                messages.vector_of(messages.decode(payload, limit), case["size"])  # type: ignore[arg-type]
        elif stage == "status":
            messages.status_from_payload(payload, case["device_id"], limit)
        elif stage == "chunks":
            reassembler = chunks.Reassembler(limit)
            for frame in case["frames"]:
                reassembler.add(case["topic"], bytes.fromhex(frame))
        else:
            return
    except (messages.MessageError, wire.WireError) as exc:
        if reason_of(exc) != case["reason"]:
            raise AssertionError(f"{case['name']}: refused as {exc}, expected {case['reason']!r}") from None
        return
    raise AssertionError(f"{case['name']}: not refused")


def message_refusals() -> list[dict]:
    task = messages.encode(typed_messages()[0][2])
    update = messages.encode(typed_messages()[6][2])
    status = messages.encode(Status(DEVICE, True))
    body = b"\x00" * 8
    two = [{"name": "a", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8},
           {"name": "b", "dtype": "<f4", "shape": [1], "offset": 4, "nbytes": 4}]
    flipped = bytearray(update)
    flipped[-1] ^= 0x01
    m = "message"
    return [
        refusal("oversized", m, "oversized message", task, max_bytes=len(task) - 1),
        refusal("truncated_prefix", m, "truncated message", task[:7]),
        refusal("truncated_header", m, "truncated message", task[:40]),
        refusal("truncated_body", m, "truncated message", update[:-1]),
        refusal("bad_magic", m, "bad magic", b"EFTX" + task[4:]),
        refusal("version_byte_3", m, "unsupported version", task[:4] + b"\x03" + task[5:]),
        # version 2 (compact, section 4.2): no body hash, entries [name, dtype, shape]; never version 1's forms
        refusal("compact_with_body_sha256", m, "bad header", compact_message(
            json.dumps({"arrays": [["a", "<f4", [2]]], "body_sha256": hashlib.sha256(body).hexdigest()}).encode(),
            body)),
        refusal("compact_with_version_1_table", m, "bad array", compact_message(
            json.dumps({"arrays": two[:1]}).encode(), body)),
        refusal("compact_table_entry_too_short", m, "bad array", compact_message(b'{"arrays":[["a","<f4"]]}', body)),
        refusal("compact_body_longer_than_table", m, "bad array",
                compact_message(b'{"arrays":[["a","<f4",[1]]]}', body)),
        refusal("compact_header_not_deflate", m, "bad header", raw_message(b"\xff" * 16, version=wire.COMPACT_VERSION)),
        refusal("compact_header_bytes_after_stream", m, "bad header", raw_message(
            wire.deflate_header(b'{"arrays":[]}') + b"\x00", version=wire.COMPACT_VERSION)),
        refusal("compact_header_inflates_beyond_limit", m, "bad header", compact_message(
            b'{"arrays":[],"pad":"' + b"a" * (1 << 20) + b'"}')),
        refusal("header_format_2", m, "unsupported version", reheader(task, format=2)),
        refusal("header_format_true", m, "unsupported version", reheader(task, format=True)),
        refusal("header_length_above_limit", m, "bad header", wire.PREFIX.pack(wire.MAGIC, 1, (1 << 20) + 1) + b"{}"),
        refusal("header_not_utf8", m, "bad header", raw_message(b'{"kind":"\xff"}')),
        refusal("header_not_json", m, "bad header", raw_message(b"{kind: task}")),
        refusal("header_not_object", m, "bad header", raw_message(b"[1,2]")),
        refusal("header_duplicate_keys", m, "bad header", raw_message(
            b'{"arrays":[],"body_sha256":"' + hashlib.sha256(b"").hexdigest().encode() + b'","round":1,"round":2}')),
        refusal("header_nan", m, "bad header", raw_message(
            b'{"arrays":[],"body_sha256":"' + hashlib.sha256(b"").hexdigest().encode() + b'","lr":NaN}')),
        refusal("header_lacks_body_sha256", m, "bad header", raw_message(b'{"arrays":[]}')),
        refusal("unknown_kind", m, "bad header", reheader(task, kind="ping")),
        refusal("kind_not_a_string", m, "bad header", reheader(task, kind=["task"])),
        refusal("missing_field", m, "bad header", reheader(task, lr=DROP)),
        refusal("required_field_null", m, "bad header", reheader(task, batch=None)),
        refusal("bool_as_int", m, "bad header", reheader(task, round=True)),
        refusal("bool_as_float", m, "bad header", reheader(task, lr=True)),
        refusal("float_as_int", m, "bad header", reheader(task, round=4.0)),
        refusal("negative_round", m, "bad header", reheader(task, round=-1)),
        refusal("deadline_not_positive", m, "bad header", reheader(task, deadline_s=0)),
        refusal("bundle_hash_uppercase", m, "bad header", reheader(task, bundle_sha256=BUNDLE.upper())),
        refusal("bundle_hash_short", m, "bad header", reheader(task, bundle_sha256=BUNDLE[:63])),
        refusal("devices_a_string", m, "bad header", reheader(task, devices=DEVICE)),
        refusal("devices_repeated", m, "bad header", reheader(task, devices=[DEVICE, DEVICE])),
        refusal("device_id_bad_form", m, "bad header", reheader(task, devices=["-dev"])),
        refusal("epochs_and_steps", m, "bad header", reheader(task, epochs=1, steps=20)),
        refusal("task_mode_unknown", m, "bad header", reheader(task, mode="fedbuff")),
        refusal("run_id_too_long", m, "bad header", reheader(task, run_id="r" * 257)),
        refusal("run_id_control_character", m, "bad header", reheader(task, run_id="run\n1")),
        refusal("base_round_not_round_minus_1", m, "bad header", reheader(
            messages.encode(typed_messages()[4][2]), base_round=2)),
        refusal("params_sha256_bad_form", m, "bad header", reheader(
            messages.encode(typed_messages()[4][2]), params_sha256="xyz")),
        refusal("samples_zero", m, "bad header", reheader(update, samples=0)),
        refusal("metrics_key_bad_form", m, "bad header", reheader(update, metrics={"Loss": 1.0})),
        refusal("metrics_key_too_long", m, "bad header", reheader(update, metrics={"k" * 65: 1.0})),
        refusal("metrics_value_bool", m, "bad header", reheader(update, metrics={"ok": True})),
        refusal("metrics_value_null", m, "bad header", reheader(update, metrics={"first_loss": None})),
        refusal("metrics_value_list", m, "bad header", reheader(update, metrics={"losses": [1.0]})),
        refusal("metrics_string_too_long", m, "bad header", reheader(update, metrics={"note": "x" * 257})),
        refusal("metrics_too_many", m, "bad header", reheader(update, metrics={f"m{i}": i for i in range(65)})),
        refusal("metrics_too_large", m, "bad header", reheader(update, metrics={f"m{i}": "x" * 99 for i in range(41)})),
        refusal("metrics_integer_beyond_2_53", m, "bad header", reheader(update, metrics={"bytes_down": 2**53})),
        refusal("metrics_integer_huge", m, "bad header", reheader(update, metrics={"samples": 10**400})),
        refusal("metrics_unit_as_string", m, "bad header", reheader(update, metrics={"peak_rss_mib": "300"})),
        refusal("samples_beyond_2_53", m, "bad header", reheader(update, samples=10**400)),
        refusal("seq_beyond_2_53", m, "bad header", reheader(update, seq=2**53)),
        refusal("round_beyond_2_53", m, "bad header", reheader(update, round=2**60)),
        refusal("task_steps_above_limit", m, "bad header", reheader(task, steps=messages.MAX_STEPS + 1)),
        refusal("task_batch_above_limit", m, "bad header", reheader(task, batch=messages.MAX_BATCH + 1)),
        refusal("task_deadline_above_limit", m, "bad header", reheader(task, deadline_s=1e9)),
        refusal("error_code_bad_form", m, "bad header", reheader(
            messages.encode(typed_messages()[7][2]), code="Out-Of-Memory")),
        refusal("error_reason_too_long", m, "bad header", reheader(
            messages.encode(typed_messages()[7][2]), reason="x" * 257)),
        refusal("status_state_unknown", m, "bad header", reheader(status, state="away")),
        refusal("status_info_nested", m, "bad header", reheader(status, info={"platform": {"machine": "x86_64"}})),
        refusal("status_info_null", m, "bad header", reheader(status, info={"last_round": None})),
        refusal("status_info_65_entries", m, "bad header", reheader(status, info={f"k{i}": i for i in range(65)})),
        refusal("status_info_string_too_long", m, "bad header", reheader(status, info={"onnxruntime": "x" * 257})),
        refusal("status_info_over_4096_bytes", m, "bad header",
                reheader(status, info={f"k{i}": "x" * 250 for i in range(20)})),
        refusal("status_info_bad_key", m, "bad header", reheader(status, info={"peak rss": 1})),
        refusal("task_with_arrays", m, "bad array", wire.encode_message(header_of(task), {"x": f32([1.0])})),
        refusal("overlapping_offsets", m, "bad array", raw_message(json.dumps(
            {"arrays": two, "body_sha256": hashlib.sha256(body).hexdigest()}).encode(), body)),
        refusal("bytes_after_last_array", m, "bad array", raw_message(json.dumps(
            {"arrays": two[:1], "body_sha256": hashlib.sha256(body + b"\0").hexdigest()}).encode(), body + b"\0")),
        refusal("big_endian_dtype", m, "bad array", raw_message(json.dumps(
            {"arrays": [{**two[0], "dtype": ">f4"}], "body_sha256": hashlib.sha256(body).hexdigest()}).encode(), body)),
        refusal("body_hash_mismatch", m, "bad hash", bytes(flipped)),
        refusal("unknown_codec", m, "bad codec", reheader(update, codec="zstd")),
    ]


def vector_refusals() -> list[dict]:
    none = encoded("none", normals(40, 8, 1.0)).arrays["values"]
    int8 = encoded("int8:8", normals(41, 8, 1.0)).arrays
    u16, u32 = np.uint16, np.uint32

    def case(name: str, reason: str, spec: str, size: int, arrays: dict[str, np.ndarray]) -> dict:
        return refusal(name, "vector", reason, carrying(spec, size, arrays), size=size)

    top = ("topk:0.25+none", 10)  # k = 2
    return [
        refusal("wrong_size", "vector", "wrong size", messages.encode(typed_messages()[6][2]), size=N + 1),
        case("extra_array", "bad codec", "none", 8, {"values": none, "extra": f32([0.0])}),
        case("missing_array", "bad codec", "int8:8", 8, {"codes": int8["codes"]}),
        case("wrong_dtype", "bad codec", "none", 8, {"values": none.astype(np.float64)}),
        case("two_dimensional", "bad codec", "none", 8, {"values": none.reshape(2, 4)}),
        case("wrong_length", "bad codec", "int8:8", 8, {"codes": int8["codes"][:7], "scale": int8["scale"]}),
        case("nan_scale", "not finite", "int8:8", 8, {"codes": int8["codes"], "scale": f32([np.nan])}),
        case("inf_value", "not finite", "fp16", 8, {"values": np.full(8, np.inf, np.float16)}),
        case("product_overflows", "not finite", "int8:8", 8, {"codes": np.full(8, 127, np.int8),
                                                              "scale": f32([3e38])}),
        case("topk_wrong_k", "bad codec", *top, {"gaps": np.array([1, 2, 3], u16), "v.values": f32([1, 2, 3])}),
        case("topk_zero_gap", "bad codec", *top, {"gaps": np.array([1, 0], u16), "v.values": f32([1, 2])}),
        case("topk_index_not_increasing", "bad codec", *top, {"index": np.array([6, 2], u32),
                                                              "v.values": f32([1, 2])}),
        case("topk_index_repeated", "bad codec", *top, {"index": np.array([2, 2], u32), "v.values": f32([1, 2])}),
        case("topk_position_beyond_n", "bad codec", *top, {"gaps": np.array([4, 6], u16), "v.values": f32([1, 2])}),
        case("topk_gaps_and_index", "bad codec", *top, {"gaps": np.array([1, 2], u16),
                                                        "index": np.array([1, 3], u32), "v.values": f32([1, 2])}),
        case("topk_inner_wrong_length", "bad codec", *top, {"gaps": np.array([1, 2], u16), "v.values": f32([1])}),
    ]


def chunk_refusals() -> list[dict]:
    """Frames fed in order to a reassembler for one sender topic; the last one is refused."""
    topic = f"{PREFIX}/update/{DEVICE}"
    payload = bytes.fromhex(chunk_cases()[1]["payload_hex"])
    frames = chunks.split(payload, 256, "m1")  # id "m1": index at byte 8, count at 12, total at 16
    first, second = frames[0], frames[1]
    other = chunks.split(payload + b"\0", 256, "m1")
    tampered = bytearray(frames[-1])
    tampered[-1] ^= 0xFF

    def at(frame: bytes, offset: int, value: bytes) -> bytes:
        return frame[:offset] + value + frame[offset + len(value):]

    def case(name: str, reason: str, sequence: list[bytes], **extra: Any) -> dict:
        return refusal(name, "chunks", reason, topic=topic, frames=[f.hex() for f in sequence], **extra)

    return [
        case("chunk_bad_magic", "bad chunk", [at(first, 0, b"EFTX")]),
        case("chunk_truncated", "bad chunk", [first[:20]]),
        case("chunk_version_2", "bad chunk", [at(first, 4, b"\x02")]),
        case("chunk_empty_id", "bad chunk", [at(first, 5, b"\x00")]),
        case("chunk_id_not_printable", "bad chunk", [at(first, 6, b" ")]),
        case("chunk_index_not_below_count", "bad chunk", [at(first, 8, struct.pack(">I", len(frames)))]),
        case("chunk_count_above_total", "bad chunk", [at(first, 12, struct.pack(">I", 10_000))]),
        case("chunk_empty_slice", "bad chunk", [first[:6 + 2 + 48]]),
        case("chunk_declares_oversized", "oversized message", [first], max_bytes=len(payload) - 1),
        case("chunks_disagree", "inconsistent chunks", [first, other[1]]),
        case("chunks_exceed_total", "inconsistent chunks", [first] + [at(first, 8, struct.pack(">I", i))
                                                                      for i in range(1, len(frames))]),
        case("chunks_fail_hash", "bad hash", [*frames[:-1], bytes(tampered)]),
        case("chunks_out_of_order_fail_hash", "bad hash", [second, *frames[2:-1], first, bytes(tampered)]),
    ]


def status_refusals() -> list[dict]:
    task = messages.encode(typed_messages()[0][2])
    return [refusal("status_text_other", "status", "truncated message", b"Online", device_id=DEVICE),
            refusal("status_text_newline", "status", "truncated message", b"online\n", device_id=DEVICE),
            refusal("status_task_message", "status", "bad header", task, device_id=DEVICE)]


def place_refusals() -> list[dict]:
    """Messages that decode but arrive where they may not: the link refuses them (PROTOCOL.md section 3)."""
    sent = {name: messages.encode(message) for name, _, message in typed_messages()}
    other = "dev-4"

    def case(name: str, place: str, message: str, reason: str, device: str | None = None) -> dict:
        return refusal(name, "place", reason, sent[message], place=place, device_id=device)

    return [
        case("task_on_global", "global", "task_steps", "bad header"),
        case("full_global_on_delta", "delta", "global_full", "bad header"),
        case("delta_on_global", "global", "global_delta", "bad header"),
        case("update_on_task", "task", "update_none", "bad header"),
        case("status_on_update", "update", "status_online", "bad header", DEVICE),
        case("update_on_status", "status", "update_none", "bad header", DEVICE),
        case("update_from_another_device", "update", "update_none", "device id mismatch", other),
        case("error_from_another_device", "update", "error_reply", "device id mismatch", other),
        case("status_of_another_device", "status", "status_online", "device id mismatch", other),
    ]


def refusals() -> list[dict]:
    return message_refusals() + vector_refusals() + chunk_refusals() + status_refusals() + place_refusals()
