"""The edgeftl wire format (format 1): one message = JSON header + raw array bytes, and chunks.

Everything read here came from the network, so `decode_message` and `Reassembler.add` check
sizes, layout, dtypes and hashes before they allocate or trust anything. numpy + stdlib only:
devices and the coordinator both import it. The byte layout is specified in docs/PROTOCOL.md.

Message (all integers big-endian):
    b"EFTL" | version u8 (=1) | header_len u32 | header (UTF-8 JSON object) | body
Chunk:
    b"EFTC" | version u8 (=1) | id_len u8 | message_id | index u32 | count u32 |
    total_len u64 | total_sha256 (32 bytes) | slice
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"EFTL"
CHUNK_MAGIC = b"EFTC"
FORMAT_VERSION = 1
PREFIX = struct.Struct(">4sBI")  # magic, version, header length: 9 bytes
CHUNK_PREFIX = struct.Struct(">4sBB")  # magic, version, message id length: 6 bytes
CHUNK_FIELDS = struct.Struct(">IIQ32s")  # index, count, total length, total sha256: 48 bytes
CHUNK_FIXED_BYTES = CHUNK_PREFIX.size + CHUNK_FIELDS.size  # 54, plus the message id
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 1024
MAX_NDIM = 32
MAX_MESSAGE_ID = 64
MIN_CHUNK = 256
# Little-endian (or byte-sized) numeric dtypes only: no objects, strings, bools or big-endian.
DTYPES = frozenset({"|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"})
RESERVED = ("arrays", "body_sha256")

# Required header fields per message kind (format 1), as device/protocol/messages.py builds them; see
# docs/PROTOCOL.md section 6. Optional fields (task epochs/steps, global base_round) are not
# listed; "status" is for the message form of a status (plain "online"/"offline" text is the
# other). Check with check_header(header, HEADER_FIELDS[kind]).
HEADER_FIELDS: dict[str, dict[str, type]] = {
    "task": {"kind": str, "format": int, "run_id": str, "round": int, "bundle_sha256": str,
             "devices": list, "deadline_s": float, "lr": float, "codec": str, "batch": int},
    "global": {"kind": str, "format": int, "run_id": str, "round": int, "bundle_sha256": str,
               "codec": str, "size": int},
    "update": {"kind": str, "format": int, "run_id": str, "round": int, "bundle_sha256": str,
               "device_id": str, "codec": str, "size": int, "samples": int, "seq": int, "metrics": dict},
    "error": {"kind": str, "format": int, "run_id": str, "round": int, "bundle_sha256": str,
              "device_id": str, "code": str, "reason": str},
    "status": {"kind": str, "format": int, "device_id": str, "state": str},
}


class WireError(ValueError):
    """Bytes from the network that are not a valid format-1 message or chunk."""


def encode_message(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise a header and named arrays into one format-1 message.

    Args:
        header: JSON-serialisable fields (finite numbers only); must not use "arrays" or
            "body_sha256", which this function writes.
        arrays: name -> numeric array; stored little-endian, C order, in the given order.

    Returns:
        The message bytes.

    Raises:
        ValueError: a reserved header key, a non-finite number, or an unsupported dtype.
    """
    clash = [key for key in RESERVED if key in header]
    if clash:
        raise ValueError(f"header keys {clash} are reserved for the wire format")
    specs, parts, offset = [], [], 0
    for name, array in arrays.items():
        data = np.asarray(array)
        code = data.dtype.str if data.dtype.itemsize == 1 else data.dtype.newbyteorder("<").str
        if code not in DTYPES:
            raise ValueError(f"array {name!r} has dtype {array.dtype.str!r}; accepted: {sorted(DTYPES)}")
        raw = data.astype(code, copy=False).tobytes(order="C")
        specs.append({"name": name, "dtype": code, "shape": list(data.shape), "offset": offset,
                      "nbytes": len(raw)})
        parts.append(raw)
        offset += len(raw)
    body = b"".join(parts)
    full = {**header, "arrays": specs, "body_sha256": hashlib.sha256(body).hexdigest()}
    text = json.dumps(full, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(text)} bytes, above the {MAX_HEADER_BYTES} limit")
    return PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)) + text + body


def decode_message(data: bytes, max_bytes: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse and verify one message; nothing is allocated before the sizes are checked.

    Args:
        data: the message bytes (bytearray / memoryview are copied to bytes first).
        max_bytes: the largest message accepted; checked before anything else is read.

    Returns:
        (header without "arrays" and "body_sha256", name -> array). The arrays are read-only
        zero-copy views into `data` (possibly unaligned): copy one to modify it or to let the
        payload be freed.

    Raises:
        WireError: one line, "<reason>: <details>", the reason being one of oversized message,
            truncated message, bad magic, unsupported version, bad header, bad array, bad hash.
    """
    if len(data) > max_bytes:
        raise WireError(f"oversized message: {len(data)} bytes, limit {max_bytes}")
    data = data if isinstance(data, bytes) else bytes(data)
    if len(data) < PREFIX.size:
        raise WireError(f"truncated message: {len(data)} bytes, shorter than the {PREFIX.size}-byte prefix")
    magic, version, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic: {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise WireError(f"unsupported version: format version {version}, this reader knows {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"bad header: header length {header_len} above the {MAX_HEADER_BYTES}-byte limit")
    if PREFIX.size + header_len > len(data):
        raise WireError(f"truncated message: header needs {header_len} bytes, "
                        f"{len(data) - PREFIX.size} present")
    header = _parse_header(data[PREFIX.size:PREFIX.size + header_len])
    start = PREFIX.size + header_len
    specs = _check_layout(header.pop("arrays"), len(data) - start)
    digest = header.pop("body_sha256")
    if hashlib.sha256(memoryview(data)[start:]).hexdigest() != digest:
        raise WireError("bad hash: body sha256 does not match the header's body_sha256 (corrupted message)")
    arrays = {}
    for name, dtype, shape, offset, nbytes in specs:
        count = nbytes // dtype.itemsize
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return header, arrays


def _reject_constant(name: str) -> None:
    raise WireError(f"bad header: holds the non-finite number {name}")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise WireError("bad header: duplicate keys")
    return result


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                            object_pairs_hook=_unique_keys)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"bad header: not UTF-8 JSON ({type(exc).__name__} {str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise WireError(f"bad header: must be a JSON object, got {type(header).__name__}")
    digest = header.get("body_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise WireError("bad header: lacks body_sha256 as 64 lowercase hex digits")
    if not isinstance(header.get("arrays"), list):
        raise WireError("bad header: lacks the arrays list")
    return header


def _check_layout(specs: list, body_len: int) -> list[tuple[str, np.dtype, tuple[int, ...], int, int]]:
    """Validate the array table against the body: dtypes, shapes, contiguous offsets."""
    if len(specs) > MAX_ARRAYS:
        raise WireError(f"bad array: {len(specs)} arrays, above the {MAX_ARRAYS} limit")
    checked, names, end = [], set(), 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise WireError(f"bad array: entry {i} must have exactly name, dtype, shape, offset, nbytes")
        name, code, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or not name or len(name) > 256 or name in names:
            raise WireError(f"bad array: entry {i} has a missing, overlong or repeated name {str(name)[:40]!r}")
        names.add(name)
        if code not in DTYPES:
            raise WireError(f"bad array: {name!r} has dtype {str(code)[:20]!r}; accepted: {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_count(d) for d in shape):
            raise WireError(f"bad array: {name!r} shape must be a list of at most {MAX_NDIM} non-negative ints")
        offset, nbytes = spec["offset"], spec["nbytes"]
        if not _count(offset) or not _count(nbytes):
            raise WireError(f"bad array: {name!r} offset and nbytes must be non-negative ints")
        dtype = np.dtype(code)
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise WireError(f"bad array: {name!r} shape {shape} x {dtype.itemsize} bytes != nbytes {nbytes}")
        if offset != end:
            raise WireError(f"bad array: {name!r} offset {offset} should be {end}; arrays must be contiguous, "
                            "in order, without gaps or overlaps")
        end = offset + nbytes
        if end > body_len:
            raise WireError(f"truncated message: array {name!r} ends at body byte {end}, body has {body_len}")
        checked.append((name, dtype, tuple(shape), offset, nbytes))
    if end != body_len:
        raise WireError(f"bad array: body has {body_len - end} bytes after the last array")
    return checked


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def check_header(header: dict, required: dict[str, type]) -> None:
    """Check that `header` has each required field with the right JSON type.

    int fields refuse booleans; float fields accept ints. Extra fields are allowed.

    Raises:
        WireError: naming the first missing or mistyped field.
    """
    for name, kind in required.items():
        if name not in header:
            raise WireError(f"bad header: lacks required field {name!r}")
        value = header[name]
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise WireError(f"bad header: field {name!r} is {type(value).__name__}, expected {kind.__name__}")
    if "format" in required and header["format"] != FORMAT_VERSION:
        raise WireError(f"unsupported version: header format {header['format']} is not {FORMAT_VERSION}")


# ---- chunks ----------------------------------------------------------------------------------


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
        """Evict the least recently active partial messages until every limit holds."""
        while self._per_sender[sender] > self.max_per_sender:
            self._drop(next(k for k in self._pending if k[0] == sender))
            self.stats["evicted_overflow"] += 1
        while len(self._pending) > self.max_pending or self._buffered > self.max_buffered:
            self._drop(next(iter(self._pending)))
            self.stats["evicted_overflow"] += 1
