"""The edgeftl message layout: one message = JSON header + raw array bytes.

Everything read here came from the network, so `decode_message` checks sizes, layout, dtypes
and the body hash before it allocates or trusts anything. numpy + stdlib only: devices and the
coordinator both import it. The layout is docs/PROTOCOL.md section 4; the header's fields per
message kind are `messages.FIELDS`; large payloads travel as chunks (`chunks.py`, section 5).

Message (all integers big-endian):
    b"EFTL" | version u8 (1 or 2) | header_len u32 | header (UTF-8 JSON object) | body [| signature]

Version 1 describes each array as {name, dtype, shape, offset, nbytes} and carries the body's
SHA-256. Version 2, the compact framing (section 4.2), describes each array as [name, dtype, shape]
(offsets and sizes follow from the order), carries no body hash (TCP or TLS guards the bytes in
transit, the chunk layer hashes what it reassembles, and a signature covers the body), and sends
the header as raw DEFLATE with a preset dictionary of the fields' common text (COMPACT_DICTIONARY):
a 1-bit update's header goes from 565 bytes to ~120. A sender uses it only where the reader said
it reads it.

A signed message's header names the algorithm in "sig"; the signature, of the length that
algorithm fixes (SIGNATURES), follows the body and covers every byte before it (auth.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

import numpy as np

MAGIC = b"EFTL"
FORMAT_VERSION = 1  # the version byte of messages and chunks, and every header's "format"
COMPACT_VERSION = 2  # the compact framing's version byte (messages only; headers' "format" stays 1)
VERSIONS = (FORMAT_VERSION, COMPACT_VERSION)
PREFIX = struct.Struct(">4sBI")  # magic, version, header length: 9 bytes
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 1024
MAX_NDIM = 32
MAX_NAME = 256  # characters of an array name
# Little-endian (or byte-sized) numeric dtypes only: no objects, strings, bools or big-endian.
DTYPES = frozenset({"|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"})
RESERVED = ("arrays", "body_sha256", "sig")
SIGNATURES = {"ed25519": 64}  # algorithm -> trailer bytes


# Version 2's preset DEFLATE dictionary (PROTOCOL.md section 4.2): text a header is likely to hold,
# the commonest (an update's canonical keys and values) last, where back-references are cheapest.
# Fixed for version 2 forever: a changed byte here changes what every compact header decodes to.
COMPACT_DICTIONARY = (
    b'"kind":"task","mode":"async","devices":[""],"deadline_s":,"lr":,"batch":,"epochs":,"steps":,"start_sha256":"",'
    b'"framing":2,"kind":"global","base_round":,"params_sha256":"","kind":"status","state":"online","info":{},'
    b'"kind":"secagg","stage":"","sig":"ed25519",["payload","|u1",[]],["masked","<u4",[]],'
    b'["values","<f4",[]],["values","<f2",[]],["codes","|i1",[]],["codes","|u1",[]],["gaps","<u2",[]],'
    b'["index","<u4",[]],["v.bits","|u1",[]],["v.codes","|i1",[]],["v.codes","|u1",[]],["v.scale","<f4",[]],'
    b'["v.values","<f4",[]],"codec":"topk:0.01+int8:256","codec":"int4:256","codec":"int8:256","codec":"fp16",'
    b'"codec":"none","platform_cpu_count":,"platform_machine":"aarch64","platform_machine":"x86_64",'
    b'"platform_python":"3.11.","platform_release":"","platform_system":"Linux","platform_total_memory_mib":,'
    b'"code":"out_of_memory","code":"train_failed","code":"no_global","code":"task_limits",'
    b'"code":"bundle_mismatch","format":1,"kind":"error","reason":"RuntimeException: ","reason":"ValueError: ",'
    b'{"arrays":[["bits","|u1",[]],["scale","<f4",[]]],"bundle_sha256":"","codec":"sign:256","device_id":"dev-",'
    b'"format":1,"kind":"update","metrics":{"bytes_down":,"first_loss":0.,"last_loss":0.,"peak_rss_mib":,'
    b'"train_time_s":},"round":,"run_id":"run-","samples":,"seq":,"size":}')


class WireError(ValueError):
    """Bytes from the network that are not a valid message or chunk."""


def encode_message(header: dict, arrays: dict[str, np.ndarray], sig: str | None = None,
                   version: int = FORMAT_VERSION) -> bytes:
    """Serialise a header and named arrays into one message.

    Args:
        header: JSON-serialisable fields (finite numbers only); must not use "arrays",
            "body_sha256" or "sig", which this function writes.
        arrays: name -> numeric array; stored little-endian, C order, in the given order.
        sig: a SIGNATURES algorithm the header declares; the signer appends the trailer.
        version: FORMAT_VERSION, or COMPACT_VERSION for the compact framing (only to a reader
            that said it reads it).

    Returns:
        The message bytes (without the signature trailer).

    Raises:
        ValueError: a reserved header key, a non-finite number, or an unsupported dtype.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown message version {version}; accepted: {VERSIONS}")
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
    if version == COMPACT_VERSION:
        full = {**header, "arrays": [[spec["name"], spec["dtype"], spec["shape"]] for spec in specs]}
    else:
        full = {**header, "arrays": specs, "body_sha256": hashlib.sha256(body).hexdigest()}
    if sig is not None:
        if sig not in SIGNATURES:
            raise ValueError(f"unknown signature algorithm {sig!r}; accepted: {sorted(SIGNATURES)}")
        full["sig"] = sig
    text = json.dumps(full, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(text)} bytes, above the {MAX_HEADER_BYTES} limit")
    if version == COMPACT_VERSION:
        text = deflate_header(text)
    return PREFIX.pack(MAGIC, version, len(text)) + text + body


def deflate_header(text: bytes) -> bytes:
    """A header's JSON text as version 2 sends it: raw DEFLATE (level 9) with COMPACT_DICTIONARY."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, COMPACT_DICTIONARY)
    return packer.compress(text) + packer.flush()


def decode_message(data: bytes, max_bytes: int,
                   max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse and verify one message; nothing is allocated before the sizes are checked.

    Args:
        data: the message bytes (bytearray / memoryview are copied to bytes first).
        max_bytes: the largest message accepted; checked before anything else is read.
        max_header_bytes: the largest header accepted (at most MAX_HEADER_BYTES); readers of
            device messages pass a small one, so a slow-to-parse header cannot stall them.

    Returns:
        (header without "arrays" and "body_sha256" ("sig" stays), name -> array), for either
        version (the caller cannot tell which; neither changes what the message means). A signature
        trailer is skipped, not checked (`signed_parts`, auth.py). The arrays are read-only
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
    if version not in VERSIONS:
        raise WireError(f"unsupported version: message version {version}, this reader knows "
                        f"{' and '.join(map(str, VERSIONS))}")
    if header_len > min(max_header_bytes, MAX_HEADER_BYTES):
        raise WireError(f"bad header: header length {header_len} above the "
                        f"{min(max_header_bytes, MAX_HEADER_BYTES)}-byte limit")
    if PREFIX.size + header_len > len(data):
        raise WireError(f"truncated message: header needs {header_len} bytes, "
                        f"{len(data) - PREFIX.size} present")
    header = _parse_header(data[PREFIX.size:PREFIX.size + header_len], version,
                           min(max_header_bytes, MAX_HEADER_BYTES))
    start = PREFIX.size + header_len
    end = len(data) - _trailer_bytes(header, len(data) - start)
    specs = _check_layout(header.pop("arrays"), end - start, version)
    digest = header.pop("body_sha256", None)
    if version == FORMAT_VERSION and hashlib.sha256(memoryview(data)[start:end]).hexdigest() != digest:
        raise WireError("bad hash: body sha256 does not match the header's body_sha256 (corrupted message)")
    arrays = {}
    for name, dtype, shape, offset, nbytes in specs:
        count = nbytes // dtype.itemsize
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return header, arrays


def signed_parts(data: bytes) -> tuple[str, bytes, bytes] | None:
    """(algorithm, the bytes signed, the signature) of a message that `decode_message` accepted,
    or None when its header declares no signature."""
    _, version, header_len = PREFIX.unpack_from(data)
    header = _parse_header(data[PREFIX.size:PREFIX.size + header_len], version)
    if "sig" not in header:
        return None
    size = _trailer_bytes(header, len(data) - PREFIX.size - header_len)
    return header["sig"], data[:-size], data[-size:]


def _trailer_bytes(header: dict, after_header: int) -> int:
    """The signature trailer's length the header declares (0 when unsigned)."""
    if "sig" not in header:
        return 0
    size = SIGNATURES.get(header["sig"]) if isinstance(header["sig"], str) else None
    if size is None:
        raise WireError(f"bad header: unknown signature algorithm {str(header['sig'])[:20]!r}; "
                        f"accepted: {sorted(SIGNATURES)}")
    if after_header < size:
        raise WireError(f"truncated message: {after_header} bytes after the header, the {header['sig']} "
                        f"signature alone needs {size}")
    return size


def _reject_constant(name: str) -> None:
    raise WireError(f"bad header: holds the non-finite number {name}")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise WireError("bad header: duplicate keys")
    return result


def _inflate(raw: bytes, limit: int) -> bytes:
    """A compact header's JSON text: raw DEFLATE with COMPACT_DICTIONARY, inflated to at most `limit`
    bytes (a small stream must not become a large allocation), ending exactly where the header does."""
    inflater = zlib.decompressobj(-15, zdict=COMPACT_DICTIONARY)
    try:
        text = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise WireError(f"bad header: not a DEFLATE stream with the version-2 dictionary ({exc})") from None
    if len(text) > limit:
        raise WireError(f"bad header: the compressed header inflates beyond the {limit}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise WireError("bad header: the compressed header does not end where header_len says")
    return text


def _parse_header(raw: bytes, version: int, limit: int = MAX_HEADER_BYTES) -> dict:
    if version == COMPACT_VERSION:
        raw = _inflate(raw, limit)
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
    if version == COMPACT_VERSION:
        if "body_sha256" in header:  # one form or the other: a reader never wonders whether a hash was checked
            raise WireError("bad header: a version-2 (compact) message carries no body_sha256")
    elif not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise WireError("bad header: lacks body_sha256 as 64 lowercase hex digits")
    if not isinstance(header.get("arrays"), list):
        raise WireError("bad header: lacks the arrays list")
    return header


def _check_layout(specs: list, body_len: int,
                  version: int) -> list[tuple[str, np.dtype, tuple[int, ...], int, int]]:
    """Validate the array table against the body: dtypes, shapes, contiguous offsets (version 1
    states them, version 2 implies them)."""
    if len(specs) > MAX_ARRAYS:
        raise WireError(f"bad array: {len(specs)} arrays, above the {MAX_ARRAYS} limit")
    checked, names, end = [], set(), 0
    for i, spec in enumerate(specs):
        if version == COMPACT_VERSION:
            if not isinstance(spec, list) or len(spec) != 3:
                raise WireError(f"bad array: entry {i} must be a list [name, dtype, shape]")
            name, code, shape = spec
        elif not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise WireError(f"bad array: entry {i} must have exactly name, dtype, shape, offset, nbytes")
        else:
            name, code, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or name in names:
            raise WireError(f"bad array: entry {i} has a missing, overlong or repeated name {str(name)[:40]!r}")
        names.add(name)
        if not isinstance(code, str) or code not in DTYPES:  # a list dtype must not raise TypeError
            raise WireError(f"bad array: {name!r} has dtype {str(code)[:20]!r}; accepted: {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_count(d) for d in shape):
            raise WireError(f"bad array: {name!r} shape must be a list of at most {MAX_NDIM} non-negative ints")
        dtype = np.dtype(code)
        if version == COMPACT_VERSION:
            offset, nbytes = end, math.prod(shape) * dtype.itemsize
        else:
            offset, nbytes = spec["offset"], spec["nbytes"]
        if not _count(offset) or not _count(nbytes):
            raise WireError(f"bad array: {name!r} offset and nbytes must be non-negative ints")
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

