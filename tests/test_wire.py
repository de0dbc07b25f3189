"""The message layout, version 1 and the compact version 2: messages round-trip; hostile bytes raise
WireError naming the fault.

The header fields of each message kind are checked by messages.decode: tests/test_conformance.py."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.wire import WireError

MAX = 1 << 20


def sample_arrays() -> dict[str, np.ndarray]:
    return {
        "values": np.array([1.0, -2.5, 3e-8], dtype=np.float32),
        "half": np.array([[0.5, -1.0], [2.0, 65504.0]], dtype=np.float16),
        "codes": np.array([-127, 0, 5, 127], dtype=np.int8),
        "packed": np.array([0x0F, 0xF0, 0x88], dtype=np.uint8),
        "index": np.array([0, 7, 2**32 - 1], dtype=np.uint32),
        "wide": np.arange(3, dtype=">f8"),  # big-endian input is stored little-endian
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.float32(7.0),
    }


def forge(header: dict, body: bytes = b"", *, magic: bytes = wire.MAGIC, version: int = 1) -> bytes:
    """A message with an arbitrary header (no validation), for hostile-input tests."""
    text = json.dumps(header).encode()
    return struct.pack(">4sBI", magic, version, len(text)) + text + body


def forged_array(spec: dict, body: bytes) -> bytes:
    entry = {"name": "x", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8, **spec}
    return forge({"arrays": [entry], "body_sha256": hashlib.sha256(body).hexdigest()}, body)


def test_round_trip_keeps_header_dtypes_shapes_and_values() -> None:
    arrays = sample_arrays()
    header = {"kind": "update", "round": 3, "metrics": {"loss": 0.25}, "device_id": "d1"}

    data = wire.encode_message(header, arrays)
    got_header, got = wire.decode_message(data, MAX)

    assert got_header == header
    assert list(got) == list(arrays)
    for name, array in arrays.items():
        expected = np.asarray(array)
        assert got[name].shape == expected.shape
        assert got[name].dtype == expected.dtype.newbyteorder("<") or got[name].dtype == expected.dtype
        np.testing.assert_array_equal(got[name], expected)
        assert not got[name].flags.writeable  # read-only views into the payload
    assert got["wide"].dtype.str == "<f8"


def test_layout_is_prefix_sorted_json_header_then_body() -> None:
    data = wire.encode_message({"b": 1, "a": 2}, {"v": np.array([1.0], dtype=np.float32)})

    magic, version, length = struct.unpack_from(">4sBI", data)
    header = json.loads(data[9:9 + length])
    body = data[9 + length:]

    assert (magic, version) == (b"EFTL", 1)
    assert list(header) == sorted(header)
    assert header["arrays"] == [{"dtype": "<f4", "name": "v", "nbytes": 4, "offset": 0, "shape": [1]}]
    assert body == struct.pack("<f", 1.0)
    assert header["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("bad", [{"arrays": []}, {"body_sha256": "0"}])
def test_encode_refuses_reserved_header_keys(bad: dict) -> None:
    with pytest.raises(ValueError, match="reserved"):
        wire.encode_message(bad, {})


@pytest.mark.parametrize("array", [np.array(["a"], dtype=object), np.array([True]), np.array([1 + 2j])])
def test_encode_refuses_unsupported_dtypes(array: np.ndarray) -> None:
    with pytest.raises(ValueError, match="dtype"):
        wire.encode_message({}, {"x": array})


def test_encode_refuses_non_finite_header_numbers() -> None:
    with pytest.raises(ValueError):
        wire.encode_message({"loss": float("nan")}, {})


def test_oversized_is_refused_before_parsing() -> None:
    data = wire.encode_message({"round": 1}, {"v": np.zeros(100, dtype=np.float32)})
    wire.decode_message(data, max_bytes=len(data))  # fits exactly

    with pytest.raises(WireError, match="oversized"):
        wire.decode_message(data, max_bytes=len(data) - 1)
    # Garbage that is too long is refused for its size, before its magic is even read.
    with pytest.raises(WireError, match="oversized"):
        wire.decode_message(b"\xff" * 1000, max_bytes=999)


def test_truncation_anywhere_is_refused() -> None:
    data = wire.encode_message({"round": 1}, {"v": np.arange(8, dtype=np.float32)})
    header_len = struct.unpack_from(">I", data, 5)[0]
    cuts = [0, 3, 8, 9, 9 + header_len // 2, 9 + header_len, len(data) - 1]

    for cut in cuts:
        with pytest.raises(WireError, match=r"truncated|not UTF-8 JSON|after the last"):
            wire.decode_message(data[:cut], MAX)


def test_trailing_bytes_are_refused() -> None:
    data = wire.encode_message({}, {"v": np.arange(2, dtype=np.float32)})
    with pytest.raises(WireError, match="after the last array"):
        wire.decode_message(data + b"\0", MAX)


def test_wrong_magic_and_version_are_refused() -> None:
    data = wire.encode_message({}, {})
    with pytest.raises(WireError, match="bad magic"):
        wire.decode_message(b"XXXX" + data[4:], MAX)
    with pytest.raises(WireError, match="version 3"):
        wire.decode_message(data[:4] + b"\x03" + data[5:], MAX)
    with pytest.raises(ValueError, match="unknown message version 3"):
        wire.encode_message({}, {}, version=3)


def test_compact_round_trip_is_the_same_message_in_fewer_bytes() -> None:
    arrays = sample_arrays()
    header = {"kind": "update", "round": 3, "metrics": {"loss": 0.25}, "device_id": "d1"}
    full = wire.encode_message(header, arrays)
    compact = wire.encode_message(header, arrays, version=wire.COMPACT_VERSION)

    assert compact[4] == 2 and full[4] == 1
    text = json.loads(inflate(compact[9:9 + struct.unpack(">I", compact[5:9])[0]]))
    assert "body_sha256" not in text and text["arrays"][0] == ["values", "<f4", [3]]
    # the hash (79 bytes) and each entry's offset, nbytes and key names go, and the rest is deflated
    assert len(full) - len(compact) > 79 + 45 * len(arrays)
    assert compact.endswith(full[-sum(np.asarray(a).nbytes for a in arrays.values()):])  # the same body
    got_header, got = wire.decode_message(compact, MAX)
    assert got_header == header and list(got) == list(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], np.asarray(array))


def inflate(raw: bytes) -> bytes:
    return zlib.decompressobj(-15, zdict=wire.COMPACT_DICTIONARY).decompress(raw)


def compact(entries: object, body: bytes = b"", **fields: object) -> bytes:
    """A version-2 message with an arbitrary header, deflated with the version's dictionary."""
    raw = wire.deflate_header(json.dumps({"arrays": entries, **fields}).encode())
    return struct.pack(">4sBI", wire.MAGIC, wire.COMPACT_VERSION, len(raw)) + raw + body


def compact_raw(raw: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">4sBI", wire.MAGIC, wire.COMPACT_VERSION, len(raw)) + raw + body


@pytest.mark.parametrize("data, reason", [
    (compact([["x", "<f4", [2]]], b"\0" * 8, body_sha256=hashlib.sha256(b"\0" * 8).hexdigest()),
     "carries no body_sha256"),  # one form or the other, never both
    (compact([{"name": "x", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8}], b"\0" * 8),
     r"\[name, dtype, shape\]"),  # version 1's entries in a version-2 message
    (compact([["x", "<f4"]], b"\0" * 8), r"\[name, dtype, shape\]"),
    (compact([["x", "<f4", [2], 0]], b"\0" * 8), r"\[name, dtype, shape\]"),
    (compact([["x", [1], [2]]], b"\0" * 8), "dtype"),  # a list where a dtype goes: refused, not a TypeError
    (compact([["x", "<f4", [-2]]], b"\0" * 8), "non-negative"),
    (compact([["x", "<f4", [2]]], b"\0" * 9), "after the last array"),
    (compact([["x", "<f4", [2]], ["y", "|u1", [1]]], b"\0" * 8), "truncated"),
    (compact([["x", "<f4", [10**12]]], b"\0" * 8), "truncated"),  # nothing allocated for it
    (compact([["x", "<f4", [1]], ["x", "<f4", [1]]], b"\0" * 8), "repeated"),
    (compact({"x": 1}), "arrays list"),
])
def test_bad_compact_messages_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        wire.decode_message(data, MAX)


@pytest.mark.parametrize("data, reason", [
    (compact_raw(json.dumps({"arrays": []}).encode()), "bad header"),  # version 1's plain JSON
    (compact_raw(b"\xff" * 40), "not a DEFLATE stream"),
    (compact_raw(wire.deflate_header(b'{"arrays":[]}')[:-2]), "does not end where header_len says"),  # cut short
    (compact_raw(wire.deflate_header(b'{"arrays":[]}') + b"\0\0"), "does not end where header_len says"),
    (compact_raw(wire.deflate_header(b'{"arrays":[],"pad":"' + b"a" * 2_000_000 + b'"}')), "inflates beyond"),  # a bomb
])
def test_bad_compact_headers_are_refused_before_they_grow(data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        wire.decode_message(data, MAX)


def test_a_compact_header_is_held_to_the_readers_header_limit_after_inflating() -> None:
    # ~1 KiB of deflate that inflates to 100 KiB: under a device topic's 16 KiB header limit it is refused
    data = compact([], pad="a" * 100_000)
    assert len(data) < 1024
    wire.decode_message(data, MAX)  # the general 1 MiB limit takes it
    with pytest.raises(WireError, match="inflates beyond the 16384-byte limit"):
        wire.decode_message(data, MAX, max_header_bytes=16 * 1024)


def test_a_list_dtype_in_version_1_is_refused_not_a_type_error() -> None:
    with pytest.raises(WireError, match="dtype"):
        wire.decode_message(forged_array({"dtype": [1]}, b"\0" * 8), MAX)


def test_header_length_beyond_limit_is_refused() -> None:
    data = struct.pack(">4sBI", b"EFTL", 1, wire.MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(WireError, match="header length"):
        wire.decode_message(data, MAX)


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"arrays": [], "body_sha256": NaN}', "non-finite"),
    (b'{"a": 1, "a": 2}', "duplicate keys"),
    (b"[" * 100_000, "not UTF-8 JSON"),
    (b'{"arrays": []}', "body_sha256"),
    (b'{"body_sha256": "' + b"0" * 64 + b'"}', "arrays list"),
])
def test_bad_headers_are_refused(raw: bytes, reason: str) -> None:
    data = struct.pack(">4sBI", b"EFTL", 1, len(raw)) + raw
    with pytest.raises(WireError, match=reason):
        wire.decode_message(data, MAX)


@pytest.mark.parametrize("spec, reason", [
    ({"dtype": "|O"}, "dtype"),
    ({"dtype": ">f4"}, "dtype"),
    ({"dtype": "<U1"}, "dtype"),
    ({"shape": [3]}, "nbytes"),
    ({"shape": [-2]}, "non-negative"),
    ({"shape": [2.0]}, "non-negative"),
    ({"shape": [True, 2]}, "non-negative"),
    ({"shape": "2"}, "shape"),
    ({"offset": 4}, "contiguous"),
    ({"nbytes": -8}, "non-negative"),
    ({"name": ""}, "name"),
    ({"extra": 1}, "exactly"),
])
def test_bad_array_entries_are_refused(spec: dict, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        wire.decode_message(forged_array(spec, b"\0" * 8), MAX)


def test_huge_declared_array_is_refused_without_allocating() -> None:
    spec = {"shape": [10**12], "nbytes": 4 * 10**12}
    with pytest.raises(WireError, match="truncated"):
        wire.decode_message(forged_array(spec, b"\0" * 8), MAX)


def test_overlapping_offsets_are_refused() -> None:
    body = b"\0" * 8
    entries = [{"name": "a", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8},
               {"name": "b", "dtype": "<f4", "shape": [1], "offset": 4, "nbytes": 4}]
    data = forge({"arrays": entries, "body_sha256": hashlib.sha256(body).hexdigest()}, body)
    with pytest.raises(WireError, match="contiguous"):
        wire.decode_message(data, MAX)


def test_repeated_array_names_are_refused() -> None:
    body = b"\0" * 8
    entries = [{"name": "a", "dtype": "<f4", "shape": [1], "offset": 0, "nbytes": 4},
               {"name": "a", "dtype": "<f4", "shape": [1], "offset": 4, "nbytes": 4}]
    data = forge({"arrays": entries, "body_sha256": hashlib.sha256(body).hexdigest()}, body)
    with pytest.raises(WireError, match="repeated"):
        wire.decode_message(data, MAX)


def test_body_hash_mismatch_is_refused() -> None:
    data = bytearray(wire.encode_message({}, {"v": np.arange(4, dtype=np.float32)}))
    data[-1] ^= 0x01
    with pytest.raises(WireError, match="sha256"):
        wire.decode_message(bytes(data), MAX)


def test_the_specs_dictionary_is_the_codes() -> None:
    # docs/PROTOCOL.md 4.2 prints version 2's DEFLATE dictionary for other implementations: the same bytes
    spec = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    start = spec.index("**The dictionary**")
    opened = spec.index("```\n", start) + 4
    block = spec[opened:spec.index("\n```", opened)]
    assert "".join(block.split("\n")).encode() == wire.COMPACT_DICTIONARY
    assert hashlib.sha256(wire.COMPACT_DICTIONARY).hexdigest() in spec[start:start + 400]
