"""Chunks (format 1): how a payload larger than one MQTT publish travels, and is put back together.

A sender cuts the payload into chunks, each a small header plus one slice; a receiver keeps
partial messages per (sender topic, message id) within fixed memory bounds and returns each
payload once, after its length and SHA-256 check. Everything read here came from the network.
The layout is docs/PROTOCOL.md section 5; topics (T/_c/i) are `topics.py`'s.

Chunk (all integers big-endian):
    b"EFTC" | version u8 (=1) | id_len u8 | message_id | index u32 | count u32 |
    total_len u64 | total_sha256 (32 bytes) | slice
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeftl.device.protocol.wire import FORMAT_VERSION, WireError

CHUNK_MAGIC = b"EFTC"
CHUNK_PREFIX = struct.Struct(">4sBB")  # magic, version, message id length: 6 bytes
CHUNK_FIELDS = struct.Struct(">IIQ32s")  # index, count, total length, total sha256: 48 bytes
CHUNK_FIXED_BYTES = CHUNK_PREFIX.size + CHUNK_FIELDS.size  # 54, plus the message id
MAX_MESSAGE_ID = 64
MIN_CHUNK = 256


def split(payload: bytes, max_chunk: int, message_id: str) -> list[bytes]:
    """Cut a payload into chunks of at most `max_chunk` bytes each, chunk header included.

    Args:
        payload: the bytes to send (any content; usually an encoded message).
        max_chunk: the largest MQTT payload allowed (>= 256).
        message_id: 1-64 printable ASCII characters, unique per sender topic.

    Raises:
        ValueError: a bad max_chunk or message id.
    """
    ident = _message_id_bytes(message_id)
    room = max_chunk - CHUNK_FIXED_BYTES - len(ident)
    if max_chunk < MIN_CHUNK or room <= 0:
        raise ValueError(f"max_chunk must be >= {MIN_CHUNK} bytes, got {max_chunk}")
    count = max(1, -(-len(payload) // room))
    digest = hashlib.sha256(payload).digest()
    prefix = CHUNK_PREFIX.pack(CHUNK_MAGIC, FORMAT_VERSION, len(ident)) + ident
    return [prefix + CHUNK_FIELDS.pack(i, count, len(payload), digest) + payload[i * room:(i + 1) * room]
            for i in range(count)]


def _message_id_bytes(message_id: str) -> bytes:
    ident = message_id.encode("ascii", errors="replace")
    if not 1 <= len(ident) <= MAX_MESSAGE_ID or not all(0x21 <= b <= 0x7E for b in ident):
        raise ValueError(f"message id must be 1-{MAX_MESSAGE_ID} printable ASCII characters, got {message_id!r}")
    return ident


@dataclass(frozen=True)
class Chunk:
    """One parsed chunk; `data` is its slice of the payload."""

    message_id: str
    index: int
    count: int
    total: int
    sha256: bytes
    data: bytes


def parse_chunk(chunk: bytes) -> Chunk:
    """Parse a chunk's header (no payload-level checks).

    Raises:
        WireError: truncated, bad magic or version, bad message id, index >= count, empty slice.
    """
    if len(chunk) < CHUNK_PREFIX.size:
        raise WireError(f"bad chunk: truncated, {len(chunk)} bytes")
    magic, version, id_len = CHUNK_PREFIX.unpack_from(chunk)
    if magic != CHUNK_MAGIC:
        raise WireError(f"bad chunk: magic {magic!r}, expected {CHUNK_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise WireError(f"bad chunk: unsupported version {version}, this reader knows {FORMAT_VERSION}")
    if len(chunk) < CHUNK_FIXED_BYTES + id_len:
        raise WireError(f"bad chunk: truncated, {len(chunk)} bytes, header needs {CHUNK_FIXED_BYTES + id_len}")
    ident = chunk[CHUNK_PREFIX.size:CHUNK_PREFIX.size + id_len]
    if not 1 <= id_len <= MAX_MESSAGE_ID or not all(0x21 <= b <= 0x7E for b in ident):
        raise WireError(f"bad chunk: message id must be 1-{MAX_MESSAGE_ID} printable ASCII bytes")
    index, count, total, digest = CHUNK_FIELDS.unpack_from(chunk, CHUNK_PREFIX.size + id_len)
    data = chunk[CHUNK_FIXED_BYTES + id_len:]
    if not index < count:
        raise WireError(f"bad chunk: index {index} is not below its count {count}")
    if count > max(1, total) or (not data and total):
        raise WireError(f"bad chunk: count {count} / slice {len(data)} bytes inconsistent with total {total}")
    return Chunk(ident.decode("ascii"), index, count, total, digest, data)


@dataclass
class _Pending:
    first: Chunk
    touched: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunks per (sender, message id) and returns each payload once, verified.

    Memory is bounded: a message above `max_message_bytes` is refused at its first chunk; at
    most `max_pending` partial messages (`max_pending_per_sender` per sender) and
    `max_buffered_bytes` of slices are held, the least recently active evicted first; a
    partial message idle for `ttl_s` (since its last chunk) is dropped. Ids completed within
    `ttl_s` are remembered so QoS 1 redeliveries do not produce the payload twice.
    """

    def __init__(self, max_message_bytes: int, max_pending: int = 1024, ttl_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, *, max_pending_per_sender: int = 4,
                 max_buffered_bytes: int | None = None) -> None:
        if min(max_message_bytes, max_pending, ttl_s, max_pending_per_sender) <= 0:
            raise ValueError("Reassembler limits must be positive")
        self.max_message_bytes, self.max_pending, self.ttl_s = max_message_bytes, max_pending, ttl_s
        self.clock, self.max_per_sender = clock, max_pending_per_sender
        self.max_buffered = max_buffered_bytes or 4 * max_message_bytes
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()  # least recently active first
        self._done: OrderedDict[tuple[str, str], float] = OrderedDict()  # completion time order
        self._per_sender: Counter[str] = Counter()
        self._buffered = 0
        self.stats = {"completed": 0, "duplicates": 0, "evicted_stale": 0, "evicted_overflow": 0, "rejected": 0}

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def limit(self, max_message_bytes: int) -> None:
        """Lower the largest message accepted (and the bytes buffered with it) from now on."""
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.max_message_bytes, self.max_buffered = max_message_bytes, 4 * max_message_bytes

    def expire(self) -> None:
        """Drop partial messages idle past ttl_s now (the reader calls this on a timer, so a
        flood that stops arriving does not hold its memory until the next chunk)."""
        self._expire(self.clock())

    def add(self, sender: str, chunk: bytes) -> bytes | None:
        """Take one chunk; return the whole payload when this chunk completes it.

        Raises:
            WireError: a malformed or oversized chunk, one inconsistent with earlier chunks of
                its message (the partial message is dropped), or a completed payload whose
                sha256 does not match.
        """
        try:
            return self._add(sender, chunk)
        except WireError:
            self.stats["rejected"] += 1
            raise

    def _add(self, sender: str, chunk: bytes) -> bytes | None:
        now = self.clock()
        self._expire(now)
        part = parse_chunk(chunk)
        key = (sender, part.message_id)
        if key in self._done:
            self.stats["duplicates"] += 1
            return None
        if part.total > self.max_message_bytes:
            raise WireError(f"oversized message: chunked {part.message_id!r} from {sender!r} declares "
                            f"{part.total} bytes, limit {self.max_message_bytes}")
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = _Pending(part, now)
            self._per_sender[sender] += 1
        elif (part.count, part.total, part.sha256) != (entry.first.count, entry.first.total, entry.first.sha256):
            self._drop(key)
            raise WireError(f"inconsistent chunks: chunk {part.index} of {part.message_id!r} from {sender!r} "
                            "disagrees with earlier chunks on count, total length or sha256")
        if part.index in entry.parts:
            self.stats["duplicates"] += 1
            return None
        if entry.size + len(part.data) > part.total:
            self._drop(key)
            raise WireError(f"inconsistent chunks: slices of {part.message_id!r} from {sender!r} exceed "
                            f"the declared {part.total} bytes")
        entry.parts[part.index] = part.data
        entry.size += len(part.data)
        self._buffered += len(part.data)
        entry.touched = now
        self._pending.move_to_end(key)
        if len(entry.parts) == part.count:
            return self._complete(key, entry, now)
        self._make_room(sender)
        return None

    def _complete(self, key: tuple[str, str], entry: _Pending, now: float) -> bytes:
        self._drop(key)
        payload = b"".join(entry.parts[i] for i in range(entry.first.count))
        if len(payload) != entry.first.total or hashlib.sha256(payload).digest() != entry.first.sha256:
            raise WireError(f"bad hash: reassembled {entry.first.message_id!r} from {key[0]!r} fails its "
                            "length/sha256 check")
        self._done[key] = now
        while len(self._done) > 16 * self.max_pending:
            self._done.popitem(last=False)
        self.stats["completed"] += 1
        return payload

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._pending.pop(key)
        self._buffered -= entry.size
        self._per_sender[key[0]] -= 1
        if not self._per_sender[key[0]]:
            del self._per_sender[key[0]]

    def _expire(self, now: float) -> None:
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if now - entry.touched <= self.ttl_s:
                break
            self._drop(key)
            self.stats["evicted_stale"] += 1
        while self._done and now - next(iter(self._done.values())) > self.ttl_s:
            self._done.popitem(last=False)

    def _make_room(self, sender: str) -> None:
        """Evict partial messages until every limit holds: a sender's own oldest beyond its share;
        then, over the global limits, the oldest of the sender holding the most partial messages
        (a flooding sender loses its own before an honest sender's one partial update goes)."""
        while self._per_sender[sender] > self.max_per_sender:
            self._drop(next(k for k in self._pending if k[0] == sender))
            self.stats["evicted_overflow"] += 1
        while len(self._pending) > self.max_pending or self._buffered > self.max_buffered:
            heaviest = max(self._per_sender, key=lambda s: self._per_sender[s])
            self._drop(next(k for k in self._pending if k[0] == heaviest))
            self.stats["evicted_overflow"] += 1
