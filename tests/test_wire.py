"""The format-1 wire format: messages round-trip; hostile bytes raise WireError naming the fault."""

from __future__ import annotations

import hashlib
import json
import random
import struct

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
        with pytest.raises(WireError, match="truncated|not UTF-8 JSON|after the last"):
            wire.decode_message(data[:cut], MAX)


def test_trailing_bytes_are_refused() -> None:
    data = wire.encode_message({}, {"v": np.arange(2, dtype=np.float32)})
    with pytest.raises(WireError, match="after the last array"):
        wire.decode_message(data + b"\0", MAX)


def test_wrong_magic_and_version_are_refused() -> None:
    data = wire.encode_message({}, {})
    with pytest.raises(WireError, match="bad magic"):
        wire.decode_message(b"XXXX" + data[4:], MAX)
    with pytest.raises(WireError, match="version 2"):
        wire.decode_message(data[:4] + b"\x02" + data[5:], MAX)


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


def test_check_header_names_missing_and_mistyped_fields() -> None:
    required = {"round": int, "deadline_s": float, "metrics": dict}
    wire.check_header({"round": 2, "deadline_s": 30, "metrics": {}}, required)  # int is a fine float

    with pytest.raises(WireError, match="lacks required field 'metrics'"):
        wire.check_header({"round": 2, "deadline_s": 1.0}, required)
    with pytest.raises(WireError, match="'round' is bool"):
        wire.check_header({"round": True, "deadline_s": 1.0, "metrics": {}}, required)
    with pytest.raises(WireError, match="format 2"):
        wire.check_header({"format": 2}, {"format": int})


def test_header_fields_cover_every_message_kind() -> None:
    from edgeftl.device.protocol.messages import KINDS

    assert set(wire.HEADER_FIELDS) == set(KINDS) == {"task", "global", "update", "error", "status"}
    assert all("kind" in fields and "format" in fields for fields in wire.HEADER_FIELDS.values())


# ---- chunks -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payload_of(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_split_respects_max_chunk_and_small_payloads_make_one_chunk() -> None:
    payload = payload_of(10_000)
    chunks = wire.split(payload, 1000, "m1")

    assert all(len(c) <= 1000 for c in chunks)
    assert len(chunks) == -(-len(payload) // (1000 - wire.CHUNK_FIXED_BYTES - 2))
    assert len(wire.split(b"abc", 1000, "m2")) == 1
    assert wire.parse_chunk(chunks[3]).index == 3


@pytest.mark.parametrize("max_chunk, message_id", [(100, "m"), (1000, ""), (1000, "x" * 65), (1000, "a b")])
def test_split_refuses_bad_arguments(max_chunk: int, message_id: str) -> None:
    with pytest.raises(ValueError):
        wire.split(b"abc", max_chunk, message_id)


def test_reassembly_with_shuffled_and_duplicated_chunks() -> None:
    payload = payload_of(50_000)
    chunks = wire.split(payload, 4096, "msg-1")
    arrivals = chunks + chunks[::3]
    random.Random(0).shuffle(arrivals)
    while arrivals[-1] in arrivals[:-1]:  # the last arrival completes the message
        arrivals.append(arrivals.pop(0))
    r = wire.Reassembler(max_message_bytes=1 << 20)

    results = [r.add("dev/a", c) for c in arrivals]

    assert results[-1] == payload
    assert all(x is None for x in results[:-1])
    assert r.stats["completed"] == 1 and r.stats["duplicates"] == len(chunks[::3]) and r.pending == 0
    assert r.add("dev/a", chunks[0]) is None  # a late redelivery does not produce it again


def test_same_message_id_from_two_senders_is_kept_apart() -> None:
    a, b = payload_of(9000, 1), payload_of(9000, 2)
    ca, cb = wire.split(a, 2048, "same"), wire.split(b, 2048, "same")
    r = wire.Reassembler(1 << 20)

    out = [r.add("x", c) for c in ca[:-1]] + [r.add("y", c) for c in cb] + [r.add("x", ca[-1])]

    assert [o for o in out if o is not None] == [b, a]


def test_oversized_chunked_message_is_refused_at_its_first_chunk() -> None:
    chunks = wire.split(payload_of(10_000), 1024, "big")
    r = wire.Reassembler(max_message_bytes=9_999)

    with pytest.raises(WireError, match="oversized"):
        r.add("s", chunks[0])
    assert r.pending == 0 and r.buffered_bytes == 0


def test_inconsistent_chunks_are_refused_and_the_partial_message_dropped() -> None:
    first = wire.split(payload_of(5000, 1), 1024, "id")
    other_total = wire.split(payload_of(6000, 2), 1024, "id")
    r = wire.Reassembler(1 << 20)
    r.add("s", first[0])

    with pytest.raises(WireError, match="disagrees"):
        r.add("s", other_total[1])
    assert r.pending == 0


def test_sha_mismatch_on_completion_is_refused() -> None:
    payload = payload_of(5000)
    chunks = wire.split(payload, 1024, "id")
    tampered = bytearray(chunks[2])
    tampered[-1] ^= 0xFF
    r = wire.Reassembler(1 << 20)

    with pytest.raises(WireError, match="sha256"):
        for chunk in chunks[:2] + [bytes(tampered)] + chunks[3:]:
            r.add("s", chunk)
    assert r.stats["rejected"] == 1 and r.pending == 0


@pytest.mark.parametrize("mutate, reason", [
    (lambda c: c[:5], "truncated"),
    (lambda c: b"XXXX" + c[4:], "magic"),
    (lambda c: c[:4] + b"\x09" + c[5:], "version"),
    (lambda c: c[:5] + b"\x00" + c[6:], "message id"),
    (lambda c: c[:8] + struct.pack(">I", 99) + c[12:], "index"),  # index 99 >= count
])
def test_malformed_chunks_are_refused(mutate, reason: str) -> None:
    chunk = wire.split(payload_of(3000), 1024, "ab")[0]  # id "ab": fields start at byte 8
    with pytest.raises(WireError, match=reason):
        wire.Reassembler(1 << 20).add("s", mutate(chunk))


def test_slices_beyond_the_declared_total_are_refused() -> None:
    chunk = wire.split(payload_of(3000), 1024, "ab")[0]
    r = wire.Reassembler(1 << 20)
    r.add("s", chunk)
    # The first slice (968 bytes) resent as chunks 1, 2, 3: 4 x 968 > the 3000 bytes declared.
    forged = [chunk[:8] + struct.pack(">I", i) + chunk[12:] for i in (1, 2, 3)]
    r.add("s", forged[0])
    r.add("s", forged[1])
    with pytest.raises(WireError, match="exceed the declared"):
        r.add("s", forged[2])


def test_stale_partial_messages_expire_after_ttl() -> None:
    clock = FakeClock()
    old = wire.split(payload_of(5000, 1), 1024, "old")
    new = wire.split(payload_of(5000, 2), 1024, "new")
    r = wire.Reassembler(1 << 20, ttl_s=30.0, clock=clock)
    r.add("s", old[0])
    clock.now = 20.0
    r.add("s", old[1])  # activity resets the clock of "old"

    clock.now = 45.0
    r.add("t", new[0])
    assert r.pending == 2 and r.stats["evicted_stale"] == 0
    clock.now = 51.0
    r.add("t", new[1])
    assert r.pending == 1 and r.stats["evicted_stale"] == 1
    assert all(r.add("s", c) is None for c in old[2:])  # "old" restarted: chunks 0, 1 are gone


def test_max_pending_evicts_the_least_recently_active() -> None:
    r = wire.Reassembler(1 << 20, max_pending=2, max_pending_per_sender=8)
    messages = {f"m{i}": wire.split(payload_of(3000, i), 1024, f"m{i}") for i in range(3)}
    for ident, chunks in messages.items():
        r.add("s", chunks[0])

    assert r.pending == 2 and r.stats["evicted_overflow"] == 1
    assert r.add("s", messages["m0"][1]) is None and r.add("s", messages["m0"][2]) is None  # m0 was evicted
    rest = [r.add("s", c) for c in messages["m2"][1:]]
    assert rest[-1] == b"".join(wire.parse_chunk(c).data for c in messages["m2"])


def test_one_sender_cannot_evict_the_others() -> None:
    r = wire.Reassembler(1 << 20, max_pending=8, max_pending_per_sender=2)
    victim = wire.split(payload_of(3000, 9), 1024, "v")
    r.add("good", victim[0])
    for i in range(5):
        r.add("noisy", wire.split(payload_of(3000, i), 1024, f"n{i}")[0])

    assert r.pending == 3
    assert [r.add("good", c) for c in victim[1:]][-1] is not None


def test_buffered_bytes_stay_under_the_cap() -> None:
    r = wire.Reassembler(10_000, max_pending=100, max_pending_per_sender=100, max_buffered_bytes=5_000)
    for i in range(10):
        r.add(f"s{i}", wire.split(payload_of(9000, i), 2048, "m")[0])
    assert r.buffered_bytes <= 5_000
