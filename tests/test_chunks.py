"""Chunks (format 1): split and reassembly, memory bounds, and hostile chunks refused by reason."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from edgeftl.device.protocol.chunks import CHUNK_FIXED_BYTES, Reassembler, parse_chunk, split
from edgeftl.device.protocol.wire import WireError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payload_of(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_split_respects_max_chunk_and_small_payloads_make_one_chunk() -> None:
    payload = payload_of(10_000)
    chunks = split(payload, 1000, "m1")

    assert all(len(c) <= 1000 for c in chunks)
    assert len(chunks) == -(-len(payload) // (1000 - CHUNK_FIXED_BYTES - 2))
    assert len(split(b"abc", 1000, "m2")) == 1
    assert parse_chunk(chunks[3]).index == 3


@pytest.mark.parametrize("max_chunk, message_id", [(100, "m"), (1000, ""), (1000, "x" * 65), (1000, "a b")])
def test_split_refuses_bad_arguments(max_chunk: int, message_id: str) -> None:
    with pytest.raises(ValueError):
        split(b"abc", max_chunk, message_id)


def test_reassembly_with_shuffled_and_duplicated_chunks() -> None:
    payload = payload_of(50_000)
    chunks = split(payload, 4096, "msg-1")
    arrivals = chunks + chunks[::3]
    random.Random(0).shuffle(arrivals)
    while arrivals[-1] in arrivals[:-1]:  # the last arrival completes the message
        arrivals.append(arrivals.pop(0))
    r = Reassembler(max_message_bytes=1 << 20)

    results = [r.add("dev/a", c) for c in arrivals]

    assert results[-1] == payload
    assert all(x is None for x in results[:-1])
    assert r.stats["completed"] == 1 and r.stats["duplicates"] == len(chunks[::3]) and r.pending == 0
    assert r.add("dev/a", chunks[0]) is None  # a late redelivery does not produce it again


def test_same_message_id_from_two_senders_is_kept_apart() -> None:
    a, b = payload_of(9000, 1), payload_of(9000, 2)
    ca, cb = split(a, 2048, "same"), split(b, 2048, "same")
    r = Reassembler(1 << 20)

    out = [r.add("x", c) for c in ca[:-1]] + [r.add("y", c) for c in cb] + [r.add("x", ca[-1])]

    assert [o for o in out if o is not None] == [b, a]


def test_oversized_chunked_message_is_refused_at_its_first_chunk() -> None:
    chunks = split(payload_of(10_000), 1024, "big")
    r = Reassembler(max_message_bytes=9_999)

    with pytest.raises(WireError, match="oversized"):
        r.add("s", chunks[0])
    assert r.pending == 0 and r.buffered_bytes == 0


def test_inconsistent_chunks_are_refused_and_the_partial_message_dropped() -> None:
    first = split(payload_of(5000, 1), 1024, "id")
    other_total = split(payload_of(6000, 2), 1024, "id")
    r = Reassembler(1 << 20)
    r.add("s", first[0])

    with pytest.raises(WireError, match="disagrees"):
        r.add("s", other_total[1])
    assert r.pending == 0


def test_sha_mismatch_on_completion_is_refused() -> None:
    payload = payload_of(5000)
    chunks = split(payload, 1024, "id")
    tampered = bytearray(chunks[2])
    tampered[-1] ^= 0xFF
    r = Reassembler(1 << 20)

    with pytest.raises(WireError, match="sha256"):
        for chunk in [*chunks[:2], bytes(tampered), *chunks[3:]]:
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
    chunk = split(payload_of(3000), 1024, "ab")[0]  # id "ab": fields start at byte 8
    with pytest.raises(WireError, match=reason):
        Reassembler(1 << 20).add("s", mutate(chunk))


def test_slices_beyond_the_declared_total_are_refused() -> None:
    chunk = split(payload_of(3000), 1024, "ab")[0]
    r = Reassembler(1 << 20)
    r.add("s", chunk)
    # The first slice (968 bytes) resent as chunks 1, 2, 3: 4 x 968 > the 3000 bytes declared.
    forged = [chunk[:8] + struct.pack(">I", i) + chunk[12:] for i in (1, 2, 3)]
    r.add("s", forged[0])
    r.add("s", forged[1])
    with pytest.raises(WireError, match="exceed the declared"):
        r.add("s", forged[2])


def test_stale_partial_messages_expire_after_ttl() -> None:
    clock = FakeClock()
    old = split(payload_of(5000, 1), 1024, "old")
    new = split(payload_of(5000, 2), 1024, "new")
    r = Reassembler(1 << 20, ttl_s=30.0, clock=clock)
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
    r = Reassembler(1 << 20, max_pending=2, max_pending_per_sender=8)
    messages = {f"m{i}": split(payload_of(3000, i), 1024, f"m{i}") for i in range(3)}
    for chunks in messages.values():
        r.add("s", chunks[0])

    assert r.pending == 2 and r.stats["evicted_overflow"] == 1
    assert r.add("s", messages["m0"][1]) is None and r.add("s", messages["m0"][2]) is None  # m0 was evicted
    rest = [r.add("s", c) for c in messages["m2"][1:]]
    assert rest[-1] == b"".join(parse_chunk(c).data for c in messages["m2"])


def test_one_sender_cannot_evict_the_others() -> None:
    r = Reassembler(1 << 20, max_pending=8, max_pending_per_sender=2)
    victim = split(payload_of(3000, 9), 1024, "v")
    r.add("good", victim[0])
    for i in range(5):
        r.add("noisy", split(payload_of(3000, i), 1024, f"n{i}")[0])

    assert r.pending == 3
    assert [r.add("good", c) for c in victim[1:]][-1] is not None


def test_buffered_bytes_stay_under_the_cap() -> None:
    r = Reassembler(10_000, max_pending=100, max_pending_per_sender=100, max_buffered_bytes=5_000)
    for i in range(10):
        r.add(f"s{i}", split(payload_of(9000, i), 2048, "m")[0])
    assert r.buffered_bytes <= 5_000


def test_expire_drops_idle_partial_messages_without_a_new_chunk() -> None:
    # A flood that stops arriving must not hold its memory until the next chunk comes
    clock = FakeClock()
    r = Reassembler(1 << 20, ttl_s=30.0, clock=clock, max_pending_per_sender=100)
    for i in range(50):
        r.add("flood", split(payload_of(3000, i), 1024, f"f{i}")[0])
    assert r.pending == 50 and r.buffered_bytes > 0
    clock.now = 31.0
    r.expire()
    assert r.pending == 0 and r.buffered_bytes == 0 and r.stats["evicted_stale"] == 50


def test_over_the_global_limits_the_heaviest_sender_loses_first() -> None:
    # An honest sender's one partial update survives a flood from many other senders' topics
    r = Reassembler(1 << 20, max_pending=10, max_pending_per_sender=4)
    honest = split(payload_of(3000, 99), 1024, "h")
    r.add("honest", honest[0])
    for i in range(40):
        r.add(f"bot{i % 5}", split(payload_of(3000, i), 1024, f"b{i}")[0])
    assert r.pending <= 10
    assert [r.add("honest", c) for c in honest[1:]][-1] == b"".join(parse_chunk(c).data for c in honest)


def test_limit_lowers_the_largest_message_accepted() -> None:
    r = Reassembler(1 << 20)
    r.limit(2000)
    with pytest.raises(WireError, match="oversized message"):
        r.add("s", split(payload_of(3000), 1024, "m")[0])
