"""Protocol messages (format 1): the headers of task, global, update and status messages.

Both sides build and check headers here, so the schema lives in one torch-free place. The byte
layout (header JSON + raw arrays, chunking) is in wire.py; docs/PROTOCOL.md is the spec.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeftl.device.protocol.codecs import Codec, CodecError, Encoded, parse_codec

PROTOCOL_VERSION = 1
KINDS = ("task", "global", "update", "error", "status")


class MessageError(ValueError):
    """A message that does not follow the protocol; the reason is one line for the log."""


@dataclass
class Task:
    """What the coordinator asks of the devices selected for one round."""

    run_id: str
    round: int
    bundle_sha256: str
    devices: list[str]
    deadline_s: float
    lr: float
    codec: str
    epochs: int | None = None
    steps: int | None = None
    batch: int = 16
    kind: str = "task"
    format: int = PROTOCOL_VERSION


@dataclass
class UpdateHeader:
    """A device's update for one round: delta = local - global, encoded with `codec`."""

    run_id: str
    round: int
    bundle_sha256: str
    device_id: str
    codec: str
    size: int
    samples: int
    seq: int = 0
    metrics: dict = field(default_factory=dict)
    kind: str = "update"
    format: int = PROTOCOL_VERSION


@dataclass
class ErrorReply:
    """A sampled device could not send its update for `round`: a short code and a one-line reason.

    Sent on the device's update topic so the coordinator stops waiting for it, logs it and counts
    it in the round record. Codes the Python device sends: see ERROR_CODES.
    """

    run_id: str
    round: int
    bundle_sha256: str
    device_id: str
    code: str
    reason: str
    kind: str = "error"
    format: int = PROTOCOL_VERSION


ERROR_CODES = {
    "out_of_memory": "training ran out of memory",
    "train_failed": "local training raised an error",
    "no_global": "the global parameters the task starts from never arrived",
}
MAX_REASON_CHARS = 256


@dataclass
class GlobalHeader:
    """Global parameters after `round` (round -1: the initial ones). Full vector when
    `base_round` is None, else a delta against the global of `base_round`."""

    run_id: str
    round: int
    bundle_sha256: str
    codec: str
    size: int
    base_round: int | None = None
    kind: str = "global"
    format: int = PROTOCOL_VERSION


def header_of(message) -> dict:
    return asdict(message)


def parse_header(header: dict, cls: type):
    """Check an untrusted header dict against a message dataclass; return the instance."""
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    if header.get("format") != PROTOCOL_VERSION:
        raise MessageError(f"protocol format {header.get('format')!r} not supported (expected {PROTOCOL_VERSION})")
    expected = cls.__dataclass_fields__
    unknown = set(header) - set(expected)
    if unknown:
        raise MessageError(f"unknown header fields {sorted(unknown)}")
    try:
        message = cls(**header)
    except TypeError as exc:
        raise MessageError(f"incomplete {cls.__name__} header: {exc}") from None
    _check_types(message)
    return message


def _check_types(message) -> None:
    for name in ("round", "size", "samples", "seq", "batch"):
        value = getattr(message, name, 0)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise MessageError(f"header field {name!r} must be an integer, got {value!r}")
    for name in ("run_id", "bundle_sha256", "codec", "device_id", "code", "reason"):
        value = getattr(message, name, "")
        if not isinstance(value, str) or len(value) > MAX_REASON_CHARS:
            raise MessageError(f"header field {name!r} must be a string of at most {MAX_REASON_CHARS} characters")
    if getattr(message, "size", 0) < 0 or getattr(message, "samples", 1) <= 0:
        raise MessageError("header sizes must be non-negative and sample counts positive")
    for name in ("lr", "deadline_s"):
        value = getattr(message, name, 1.0)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise MessageError(f"header field {name!r} must be a positive number, got {value!r}")
    metrics = getattr(message, "metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > 64:
        raise MessageError("metrics must be a JSON object with at most 64 entries")


def decode_vector(codec_spec: str, size: int, arrays: dict[str, np.ndarray], expected: int) -> np.ndarray:
    """Decode a vector payload, checking codec, length and finiteness."""
    if size != expected:
        raise MessageError(f"vector has {size} values, the bundle has {expected}")
    try:
        codec: Codec = parse_codec(codec_spec)
        vector = codec.decode(Encoded(codec.spec, size, arrays))
    except CodecError as exc:
        raise MessageError(str(exc)) from None
    if not np.isfinite(vector).all():
        raise MessageError("vector holds NaN or Inf")
    return vector
