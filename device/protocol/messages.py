"""The protocol's messages as typed objects (format 1), and their bytes.

`encode(message)` gives the bytes of one message (wire.py's layout); `decode(payload, ...)`
checks untrusted bytes and returns the typed message or raises MessageError with a one-line
reason. Each field's rule is written once, in FIELDS below, and both sides use it. The spec is
docs/PROTOCOL.md section 6; the conformance vectors in docs/conformance/ exercise every rule.

Extension rule (PROTOCOL.md section 10): a reader ignores header fields it does not know, so an
optional field can be added without a new format; a kind it does not know is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeftl.device.protocol import wire
from edgeftl.device.protocol.codecs import Codec, CodecError, Encoded, parse_codec
from edgeftl.device.protocol.topics import DEVICE_ID
from edgeftl.device.secagg.messages import STAGES as SECAGG_STAGES
from edgeftl.device.secagg.messages import UP_STAGES as SECAGG_UP_STAGES

FORMAT = wire.FORMAT_VERSION
MAX_TEXT = 256  # run ids, codec specs, reasons, metric strings
MAX_METRICS = 64
MAX_METRICS_BYTES = 4096  # an update's metrics object as compact JSON
MAX_INT = 2**53 - 1  # the largest integer every JSON implementation holds exactly; no field goes above
# Task limits every reader enforces (a device enforces its own, lower ones too: AgentConfig).
MAX_EPOCHS, MAX_STEPS, MAX_BATCH = 1000, 1_000_000, 65536
MAX_DEADLINE_S, MAX_LR = 7 * 86400.0, 100.0
_UNIT_SUFFIXES = ("_s", "_mib", "_bytes")  # metrics with a unit hold numbers
# Headers of what devices send (updates, error replies, statuses) are small: metrics are at most
# 4 KiB, the rest a few hundred bytes. Readers refuse longer ones before parsing them.
MAX_DEVICE_HEADER_BYTES = 16 * 1024
ERROR_CODES = {
    "out_of_memory": "training ran out of memory",
    "train_failed": "local training raised an error",
    "no_global": "the global parameters the task starts from never arrived",
    "task_limits": "the task asks for more local work than the device's limits allow",
    "bundle_mismatch": "the device holds another bundle than the task's (the reason names both hashes)",
}
STATUS_STATES = ("online", "offline")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_METRIC_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_INFO_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


StatusInfo = dict[str, str | int | float]  # a status's card (section 6.4): flat, strings and numbers


class MessageError(ValueError):
    """Bytes or fields that do not follow the protocol; the reason is one line for the log."""


# ---- the messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What the coordinator asks of the devices sampled for one round (retained, no arrays).

    `mode` "async" (FedBuff, PROTOCOL.md section 6.1): each named device trains once on the
    latest global it holds (version round - 1 or newer) and names that version + 1 as its
    update's round; "sync" (the default, never written on the wire) trains on global round - 1."""

    run_id: str
    round: int
    bundle_sha256: str
    devices: tuple[str, ...]
    deadline_s: float
    lr: float
    codec: str
    epochs: int | None = None
    steps: int | None = None
    batch: int = 16
    mode: str = "sync"
    # params_sha256 of the global the round starts from (optional): a device whose bundle's own
    # trainable values hash to it starts from them, and downloads no full vector (round 0).
    start_sha256: str | None = None
    # The newest message version the coordinator reads (section 4.2): 2 lets a device send its reply
    # in the compact framing. 1, the default, is never written on the wire.
    framing: int = wire.FORMAT_VERSION

    @property
    def is_async(self) -> bool:
        return self.mode == "async"


TASK_MODES = ("sync", "async")


@dataclass(frozen=True)
class Global:
    """Global parameters after `round` (-1: the initial ones): the full vector when `base_round`
    is None, else the delta params(round) - params(base_round), base_round = round - 1.
    `params_sha256` (optional) is the hash of params(round) as float32 little-endian bytes: a
    device whose sum after a delta hashes otherwise fetches the retained full vector."""

    run_id: str
    round: int
    bundle_sha256: str
    vector: Encoded
    base_round: int | None = None
    params_sha256: str | None = None

    @property
    def is_delta(self) -> bool:
        return self.base_round is not None


@dataclass(frozen=True)
class Update:
    """A device's update for one round: the delta local - global(round - 1), encoded."""

    run_id: str
    round: int
    bundle_sha256: str
    device_id: str
    samples: int
    seq: int
    vector: Encoded
    metrics: dict[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorReply:
    """A sampled device that cannot send its update for `round` says why (code + one line)."""

    run_id: str
    round: int
    bundle_sha256: str
    device_id: str
    code: str
    reason: str


@dataclass(frozen=True)
class Status:
    """A device's presence: its birth (online) and its will (offline), retained. `info` is its
    card (PROTOCOL.md section 6.4: platform, runtime, bundle, last round...), empty for none."""

    device_id: str
    online: bool
    info: StatusInfo = field(default_factory=dict)


@dataclass(frozen=True)
class SecAgg:
    """One stage of secure aggregation (docs/SECAGG.md): from a device on its own secagg topic, or
    from the coordinator to the one device `device_id`. `payload` holds the stage's fields (parsed by
    edgeftl.device.secagg.messages), `masked` the masked vector of the masked stage."""

    run_id: str
    round: int
    bundle_sha256: str
    device_id: str
    stage: str
    payload: bytes
    masked: np.ndarray | None = None


Message = Task | Global | Update | ErrorReply | Status | SecAgg
KINDS: dict[str, type] = {"task": Task, "global": Global, "update": Update, "error": ErrorReply, "status": Status,
                          "secagg": SecAgg}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}


def kind_of(message: Message) -> str:
    return _KIND_OF[type(message)]


# ---- field rules: one home for every header field's type and range -------------------------


def _int(low: int, high: int = MAX_INT) -> Any:
    def check(value: object) -> bool:
        return type(value) is int and low <= value <= high
    check.__doc__ = f"an integer in {low}..{high}"
    return check


def _number(value: object) -> bool:
    """A JSON number that every reader holds as a finite float (an int of 10**400 is not one)."""
    if type(value) is int:
        return -MAX_INT <= value <= MAX_INT
    return type(value) is float and math.isfinite(value)


def _positive(high: float) -> Any:
    def check(value: object) -> bool:
        return _number(value) and 0 < value <= high  # type: ignore[operator]
    check.__doc__ = f"a number > 0 and <= {high:g}"
    return check


def _text(pattern: re.Pattern[str] | None = None, low: int = 1) -> Any:
    def check(value: object) -> bool:
        return (isinstance(value, str) and low <= len(value) <= MAX_TEXT and value.isprintable()
                and (pattern is None or pattern.fullmatch(value) is not None))
    check.__doc__ = f"a string of {low}-{MAX_TEXT} printable characters" + (
        f" matching {pattern.pattern}" if pattern else "")
    return check


def _devices(value: object) -> bool:
    """a list of distinct device ids"""
    return (isinstance(value, list) and len(set(map(str, value))) == len(value)
            and all(isinstance(d, str) and DEVICE_ID.fullmatch(d) for d in value))


def _metrics(value: object) -> bool:
    """an object of at most 64 entries and 4096 bytes as JSON: keys [a-z][a-z0-9_]{0,63}, values
    numbers (finite, integers within +-(2**53 - 1)) or strings of at most 256 printable characters;
    keys with a unit (ending _s, _mib, _bytes, or starting bytes_) hold numbers"""
    return (isinstance(value, dict) and len(value) <= MAX_METRICS
            and all(isinstance(k, str) and metric_ok(k, v) for k, v in value.items())
            and len(json.dumps(value, separators=(",", ":"))) <= MAX_METRICS_BYTES)


def _info(value: object) -> bool:
    """an object of at most 64 entries and 4096 bytes as JSON: keys of 1-64 characters of
    [A-Za-z0-9_.-], values numbers (finite, integers within +-(2**53 - 1)) or strings of at most 256
    printable characters"""
    return (isinstance(value, dict) and len(value) <= MAX_METRICS
            and all(isinstance(k, str) and _INFO_KEY.fullmatch(k) is not None and info_value_ok(v)
                    for k, v in value.items())
            and len(json.dumps(value, separators=(",", ":"))) <= MAX_METRICS_BYTES)


def info_value_ok(value: object) -> bool:
    """A value a status's info may hold: a finite number (integers within +-MAX_INT) or a printable string
    of at most MAX_TEXT characters; a device leaves out what it does not know rather than send null."""
    return _number(value) or (isinstance(value, str) and len(value) <= MAX_TEXT and value.isprintable())


def metric_ok(key: object, value: object) -> bool:
    """One metric entry as the spec allows it (section 6.3): readers of records use it too."""
    if not isinstance(key, str) or not _METRIC_KEY.fullmatch(key):
        return False
    if _number(value):
        return True
    has_unit = key.endswith(_UNIT_SUFFIXES) or key.startswith("bytes_")
    return not has_unit and isinstance(value, str) and len(value) <= MAX_TEXT and value.isprintable()


_ROUND, _SHA = _int(0), _text(_HEX64, 64)
_DEVICE = _text(DEVICE_ID)
_DEVICE.__doc__ = "a device id: 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit"
# kind -> field -> (required, rule). Codec specs and vector sizes are checked with the arrays.
FIELDS: dict[str, dict[str, tuple[bool, Any]]] = {
    "task": {"run_id": (True, _text()), "round": (True, _ROUND), "bundle_sha256": (True, _SHA),
             "devices": (True, _devices), "deadline_s": (True, _positive(MAX_DEADLINE_S)),
             "lr": (True, _positive(MAX_LR)), "codec": (True, _text()), "epochs": (False, _int(1, MAX_EPOCHS)),
             "steps": (False, _int(1, MAX_STEPS)), "batch": (True, _int(1, MAX_BATCH)),
             "mode": (False, lambda v: v in TASK_MODES),
             "start_sha256": (False, _SHA), "framing": (False, _int(1, 255))},
    "global": {"run_id": (True, _text()), "round": (True, _int(-1)), "bundle_sha256": (True, _SHA),
               "codec": (True, _text()), "size": (True, _int(0)), "base_round": (False, _int(-1)),
               "params_sha256": (False, _SHA)},
    "update": {"run_id": (True, _text()), "round": (True, _ROUND), "bundle_sha256": (True, _SHA),
               "device_id": (True, _DEVICE), "codec": (True, _text()), "size": (True, _int(0)),
               "samples": (True, _int(1)), "seq": (True, _int(0)), "metrics": (True, _metrics)},
    "error": {"run_id": (True, _text()), "round": (True, _ROUND), "bundle_sha256": (True, _SHA),
              "device_id": (True, _DEVICE), "code": (True, _text(_CODE)), "reason": (True, _text(low=0))},
    "status": {"device_id": (True, _DEVICE), "state": (True, lambda v: v in STATUS_STATES),
               "info": (False, _info)},
    "secagg": {"run_id": (True, _text()), "round": (True, _ROUND), "bundle_sha256": (True, _SHA),
               "device_id": (True, _DEVICE), "stage": (True, lambda v: v in SECAGG_STAGES)},
}
FIELDS["status"]["state"][1].__doc__ = "'online' or 'offline'"
FIELDS["task"]["mode"][1].__doc__ = "'sync' or 'async'"
FIELDS["secagg"]["stage"][1].__doc__ = f"one of {', '.join(SECAGG_STAGES)}"
_WITH_ARRAYS = ("global", "update", "secagg")


# ---- bytes ----------------------------------------------------------------------------------


def encode(message: Message, sig: str | None = None, version: int = wire.FORMAT_VERSION) -> bytes:
    """The bytes of one message (docs/PROTOCOL.md section 4), header keys sorted; with `sig`, the
    header declares that signature algorithm and the signer appends the trailer (auth.py); with
    `version` 2, in the compact framing (section 4.2), for a reader that said it reads it.

    Raises:
        MessageError: a field that breaks its rule (the same check a reader makes).
    """
    kind = kind_of(message)
    header: dict[str, Any] = {"kind": kind, "format": FORMAT}
    arrays: dict[str, np.ndarray] = {}
    if isinstance(message, Status):
        header.update(device_id=message.device_id, state=STATUS_STATES[0] if message.online else STATUS_STATES[1])
        if message.info:  # a status without a card encodes as it did before `info` existed
            header["info"] = message.info
    else:
        carried = ("codec", "size") if isinstance(message, (Global, Update)) else ()
        header.update({name: getattr(message, name) for name in FIELDS[kind] if name not in carried})
        if isinstance(message, Task):
            header["devices"] = list(message.devices)
            if not message.is_async:  # a sync task encodes as it did before `mode` existed
                del header["mode"]
            if message.start_sha256 is None:  # a task without it encodes as before the field existed
                del header["start_sha256"]
            if message.framing == wire.FORMAT_VERSION:  # likewise
                del header["framing"]
        if isinstance(message, (Global, Update)):
            header.update(codec=message.vector.codec, size=message.vector.size)
            arrays = message.vector.arrays
        if isinstance(message, SecAgg):
            arrays = _secagg_arrays(message)
    _check_fields(kind, header)
    return wire.encode_message(header, arrays, sig, version)


def reply_version(task: Task) -> int:
    """The message version to answer `task` in: the newest this side writes that the coordinator
    reads (section 4.2). A task without `framing` gets version 1, as every reader reads."""
    return min(task.framing, max(wire.VERSIONS))


def decode(payload: bytes, max_bytes: int, max_header_bytes: int = wire.MAX_HEADER_BYTES) -> Message:
    """Check untrusted bytes (sizes first, then layout, hash, kind, every field) and type them.

    Raises:
        MessageError: one line, "<reason>: <details>".
    """
    try:
        header, arrays = wire.decode_message(payload, max_bytes, max_header_bytes)
    except wire.WireError as exc:
        raise MessageError(str(exc)) from None
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:  # a list or object kind must not raise TypeError
        raise MessageError(f"bad header: unknown message kind {str(kind)[:40]!r}; known: {', '.join(KINDS)}")
    if type(header.get("format")) is not int or header["format"] != FORMAT:  # true == 1 in Python
        raise MessageError(f"unsupported version: header format {header.get('format')!r}, this reader knows {FORMAT}")
    _check_fields(kind, header)
    if arrays and kind not in _WITH_ARRAYS:
        raise MessageError(f"bad array: a {kind} message carries no arrays, this one has {len(arrays)}")
    return _build(kind, header, arrays)


def status_from_payload(payload: bytes, device_id: str, max_bytes: int) -> Status:
    """A status in either form the spec allows: the text online/offline, or a status message."""
    if payload in (b"online", b"offline"):
        return Status(device_id, payload == b"online")
    message = decode(payload, max_bytes, MAX_DEVICE_HEADER_BYTES)
    if not isinstance(message, Status):
        raise MessageError(f"bad header: a {kind_of(message)} message on a status topic")
    return message


def status_payload(status: Status) -> bytes:
    """What an unsigned device sends as its birth and will: the text form (the form every broker can
    show) for a status without a card, the message form for one with a card (the text has no room)."""
    if status.info:
        return encode(status)
    return STATUS_STATES[0].encode() if status.online else STATUS_STATES[1].encode()


def _check_fields(kind: str, header: dict[str, Any]) -> None:
    for name, (required, rule) in FIELDS[kind].items():
        value = header.get(name)
        if value is None and not required:
            continue
        if name not in header:
            raise MessageError(f"bad header: {kind} lacks required field {name!r}")
        if not rule(value):
            accepted = " ".join(str(rule.__doc__).split())  # one line, though a rule's docstring wraps
            raise MessageError(f"bad header: {kind} field {name!r} is {_show(value)}, expected {accepted}")
    if kind == "task" and header.get("epochs") is not None and header.get("steps") is not None:
        raise MessageError("bad header: task sets both epochs and steps; at most one is allowed")
    if kind == "global" and header.get("base_round") is not None and header["base_round"] != header["round"] - 1:
        raise MessageError(f"bad header: global base_round {header['base_round']} is not round - 1 "
                           f"({header['round'] - 1})")


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _build(kind: str, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Message:
    h = header
    if kind == "task":
        _codec(h["codec"])  # refused here, not after the device trained a round
        return Task(h["run_id"], h["round"], h["bundle_sha256"], tuple(h["devices"]), float(h["deadline_s"]),
                    float(h["lr"]), h["codec"], h.get("epochs"), h.get("steps"), h["batch"], h.get("mode") or "sync",
                    h.get("start_sha256"), h.get("framing") or wire.FORMAT_VERSION)
    if kind == "error":
        return ErrorReply(h["run_id"], h["round"], h["bundle_sha256"], h["device_id"], h["code"], h["reason"])
    if kind == "status":
        return Status(h["device_id"], h["state"] == "online", dict(h.get("info") or {}))
    if kind == "secagg":
        return _secagg(h, arrays)
    vector = _encoded(h["codec"], h["size"], arrays)
    if kind == "global":
        return Global(h["run_id"], h["round"], h["bundle_sha256"], vector, h.get("base_round"), h.get("params_sha256"))
    return Update(h["run_id"], h["round"], h["bundle_sha256"], h["device_id"], h["samples"], h["seq"], vector,
                  h["metrics"])


def _secagg_arrays(message: SecAgg) -> dict[str, np.ndarray]:
    arrays = {"payload": np.frombuffer(message.payload, dtype=np.uint8)}
    if message.masked is not None:
        arrays["masked"] = message.masked
    return arrays


def _secagg(h: dict[str, Any], arrays: dict[str, np.ndarray]) -> SecAgg:
    """A secagg message: a 1-D uint8 "payload" array and, optionally, a 1-D uint32 "masked" one."""
    payload, masked = arrays.get("payload"), arrays.get("masked")
    if (payload is None or payload.dtype != np.uint8 or payload.ndim != 1 or set(arrays) - {"payload", "masked"}
            or (masked is not None and (masked.dtype != np.dtype("<u4") or masked.ndim != 1))):
        raise MessageError(f"bad array: a secagg message carries a 1-D uint8 'payload' and optionally a 1-D uint32 "
                           f"'masked', this one has {sorted(arrays)[:4]}")
    return SecAgg(h["run_id"], h["round"], h["bundle_sha256"], h["device_id"], h["stage"], payload.tobytes(),
                  None if masked is None else masked.astype(np.uint32))


def _encoded(spec: str, size: int, arrays: dict[str, np.ndarray]) -> Encoded:
    """The arrays as the codec's payload; their names, dtypes and lengths are checked on decoding
    (`vector_of`), where the bundle's length is known."""
    return Encoded(_codec(spec).spec, size, arrays)


def _codec(spec: str) -> Codec:
    try:
        return parse_codec(spec)
    except CodecError as exc:
        raise MessageError(f"bad codec: {exc}") from None


# ---- where each kind may arrive -------------------------------------------------------------

# The place a topic names (topics.Topics.parse) -> the kinds accepted there (docs/PROTOCOL.md
# section 3). A global on the full topic has no base_round; one on the delta topic has one.
ACCEPTED_AT: dict[str, tuple[str, ...]] = {"task": ("task",), "global": ("global",), "delta": ("global",),
                                           "update": ("update", "error"), "status": ("status",),
                                           "secagg_up": ("secagg",), "secagg_down": ("secagg",)}
# The places devices publish on: headers there are at most MAX_DEVICE_HEADER_BYTES.
DEVICE_PLACES = ("update", "status", "secagg_up")


def check_place(place: str, device_id: str | None, message: Message) -> None:
    """Refuse a message that arrived where its kind does not go, or from another device's topic."""
    kind = kind_of(message)
    if kind not in ACCEPTED_AT[place]:
        raise MessageError(f"bad header: a {kind} message on the {place} topic")
    if isinstance(message, Global) and message.is_delta != (place == "delta"):
        raise MessageError(f"bad header: a {'delta' if message.is_delta else 'full'} global on the {place} topic")
    if isinstance(message, SecAgg) and (message.stage in SECAGG_UP_STAGES) != (place == "secagg_up"):
        raise MessageError(f"bad header: secagg stage {message.stage!r} on the {place} topic")
    sender = getattr(message, "device_id", device_id)
    if sender != device_id:
        raise MessageError(f"device id mismatch: header says {sender!r}, topic says {device_id!r}")


# ---- vectors --------------------------------------------------------------------------------


def vector_of(message: Global | Update, expected: int) -> np.ndarray:
    """The float32 vector a global or update carries, checked against the bundle's length.

    Raises:
        MessageError: a length other than `expected`, arrays the codec refuses, NaN or Inf.
    """
    encoded = message.vector
    if encoded.size != expected:
        raise MessageError(f"wrong size: vector has {encoded.size} values, the bundle has {expected}")
    if any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in encoded.arrays.values()):
        raise MessageError("not finite: a value or scale array holds NaN or Inf")
    codec: Codec = parse_codec(encoded.codec)
    try:
        vector = codec.decode(encoded)
    except CodecError as exc:
        raise MessageError(f"bad codec: {exc}") from None
    if not np.isfinite(vector).all():
        raise MessageError("not finite: vector holds NaN or Inf")
    return vector


def largest_update_bytes(size: int) -> int:
    """An upper bound on an honest update's bytes for a vector of `size` values: the largest
    codec payload (top-k at fraction 1 sends 4-byte indices and 4-byte values), a device header,
    and the array table. A reader may refuse anything longer before buffering it."""
    return wire.PREFIX.size + MAX_DEVICE_HEADER_BYTES + 8 * size + 4096


def apply_delta(reference: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """params(round) = params(base_round) + delta, element by element in IEEE float32 (PROTOCOL.md
    section 6.2): every implementation that follows this gets bit-identical parameters."""
    return np.add(reference.astype(np.float32, copy=False), delta.astype(np.float32, copy=False), dtype=np.float32)


def params_sha256(params: np.ndarray) -> str:
    """The hash a global carries of the parameters it leads to: SHA-256 of float32 little-endian bytes."""
    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").tobytes()).hexdigest()


def reason_kind(reason: str) -> str:
    """What a refusal is counted under: its text before the first ':' ("bad header: ..." ->
    "bad header"), the reason prefixes docs/PROTOCOL.md section 8 lists."""
    return reason.split(":")[0].split("(")[0].strip()[:60]


def one_line(reason: str) -> str:
    """An error reply's reason: whitespace collapsed, at most MAX_TEXT characters."""
    return " ".join(reason.split())[:MAX_TEXT]
