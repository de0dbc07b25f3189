"""Each secure-aggregation stage's payload: typed objects, their bytes, and the checks on them.

On the wire a stage travels inside a protocol `SecAgg` message (device/protocol/messages.py):
its header names the stage, its "payload" array (uint8) holds the stage's fields as a JSON
object (UTF-8, sorted keys; byte strings as lowercase hex), and the masked stage adds the
"masked" array (<u4). docs/SECAGG.md section 5 lists every field. Devices send the UP stages
on their own topic; the coordinator sends the DOWN stages to one device each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeftl.device.secagg import crypto, shamir
from edgeftl.device.secagg.errors import SecAggError
from edgeftl.device.secagg.fixedpoint import FixedPoint

UP_STAGES = ("advertise", "share", "masked", "unmask")
DOWN_STAGES = ("roster", "ciphertexts", "survivors")
STAGES = UP_STAGES + DOWN_STAGES
MAX_DEVICES = 1024  # roster size a device accepts
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
SIGNATURE_BYTES = 64  # Ed25519
SEALED_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + crypto.TAG_BYTES  # 94
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # = protocol.topics.DEVICE_ID


@dataclass(frozen=True)
class Advertise:
    """Stage 0, device -> coordinator: this round's public keys and a commitment to the self-mask seed."""

    c_pk: bytes
    s_pk: bytes
    b_commit: bytes  # SHA-256 of the self-mask seed b: lets the coordinator check its reconstruction
    signature: bytes = b""  # Ed25519 of crypto.advertised_bytes by the device's identity key; b"" = unsigned

    def signed_part(self, ctx: bytes, device_id: str) -> bytes:
        """What a device signs: the round's context, its id and its three values (docs/SECAGG.md section 8)."""
        return b"|".join((b"edgeftl-secagg advertise", ctx, device_id.encode(), self.c_pk, self.s_pk, self.b_commit))


@dataclass(frozen=True)
class Params:
    threshold: int  # t: shares needed to reconstruct, and the fewest devices any stage may continue with
    size: int  # m: values of an update (the masked vector has m + 1)
    fixed: FixedPoint


@dataclass(frozen=True)
class Member:
    device_id: str
    keys: Advertise


@dataclass(frozen=True)
class Roster:
    """Stage 0's answer, coordinator -> each device that advertised: the parameters and everyone's keys."""

    params: Params
    members: tuple[Member, ...]  # sorted by device id; a device's Shamir point is its place + 1

    def point(self, device_id: str) -> int:
        return 1 + [m.device_id for m in self.members].index(device_id)

    def ids(self) -> list[str]:
        return [m.device_id for m in self.members]


@dataclass(frozen=True)
class Shares:
    """Stage 1, device -> coordinator: one sealed share pair for every other roster member."""

    sealed: dict[str, bytes]  # recipient -> ciphertext


@dataclass(frozen=True)
class Ciphertexts:
    """Stage 1's answer, coordinator -> device v: the sealed shares addressed to v by each device that shared."""

    sealed: dict[str, bytes]  # sender -> ciphertext


@dataclass(frozen=True)
class Masked:
    """Stage 2, device -> coordinator: the masked vector (m + 1 uint32)."""

    vector: np.ndarray


@dataclass(frozen=True)
class Survivors:
    """Stage 2's answer, coordinator -> each device whose masked vector arrived: who those are."""

    devices: tuple[str, ...]


@dataclass(frozen=True)
class Unmask:
    """Stage 3, device -> coordinator: shares of b for survivors, of s_sk for those who dropped."""

    b_shares: dict[str, bytes]
    s_shares: dict[str, bytes]


Stage = Advertise | Roster | Shares | Ciphertexts | Masked | Survivors | Unmask
_NAMES = {Advertise: "advertise", Roster: "roster", Shares: "share", Ciphertexts: "ciphertexts",
          Masked: "masked", Survivors: "survivors", Unmask: "unmask"}


def stage_name(stage: Stage) -> str:
    return _NAMES[type(stage)]


def to_payload(stage: Stage) -> tuple[str, bytes, np.ndarray | None]:
    """(stage name, payload bytes, masked vector or None) of one stage."""
    fields: dict[str, object]
    if isinstance(stage, Advertise):
        fields = dict(_keys(stage))
    elif isinstance(stage, Roster):
        f = stage.params.fixed
        fields = {"threshold": stage.params.threshold, "size": stage.params.size, "clip": f.clip,
                  "weight_cap": f.weight_cap, "max_devices": f.max_devices,
                  "devices": [{"id": m.device_id, **_keys(m.keys)} for m in stage.members]}
    elif isinstance(stage, (Shares, Ciphertexts)):
        fields = {"sealed": {k: v.hex() for k, v in sorted(stage.sealed.items())}}
    elif isinstance(stage, Masked):
        fields = {}
    elif isinstance(stage, Survivors):
        fields = {"devices": list(stage.devices)}
    else:
        fields = {"b_shares": {k: v.hex() for k, v in sorted(stage.b_shares.items())},
                  "s_shares": {k: v.hex() for k, v in sorted(stage.s_shares.items())}}
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return stage_name(stage), payload, stage.vector if isinstance(stage, Masked) else None


def _keys(keys: Advertise) -> dict[str, str]:
    signed = {"signature": keys.signature.hex()} if keys.signature else {}
    return {"c_pk": keys.c_pk.hex(), "s_pk": keys.s_pk.hex(), "b_commit": keys.b_commit.hex(), **signed}


def from_payload(name: str, payload: bytes, masked: np.ndarray | None = None) -> Stage:
    """Check a stage's untrusted bytes and type them.

    Raises:
        SecAggError: one line naming the stage, the field and what is accepted.
    """
    if name not in STAGES:
        raise SecAggError(f"bad stage: {name[:40]!r}; known: {', '.join(STAGES)}")
    if (masked is not None) != (name == "masked"):
        raise SecAggError(f"bad array: stage {name!r} {'lacks' if masked is None else 'carries'} a masked vector")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SecAggError(f"oversized payload: {len(payload)} bytes, at most {MAX_PAYLOAD_BYTES}")
    try:
        fields = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError):
        raise SecAggError(f"bad payload: stage {name!r} is not a UTF-8 JSON object") from None
    if not isinstance(fields, dict):
        raise SecAggError(f"bad payload: stage {name!r} is not a JSON object")
    return _READERS[name](_Fields(name, fields), masked)


class _Fields:
    """Typed access to one stage's JSON fields, each failure a one-line SecAggError."""

    def __init__(self, stage: str, fields: dict) -> None:
        self.stage, self.fields = stage, fields

    def fail(self, name: str, expected: str) -> SecAggError:
        shown = repr(self.fields.get(name))[:40]
        return SecAggError(f"bad field: {self.stage} field {name!r} is {shown}, expected {expected}")

    def raw(self, name: str, fields: dict | None = None) -> object:
        source = self.fields if fields is None else fields
        if name not in source:
            raise SecAggError(f"bad field: {self.stage} lacks field {name!r}")
        return source[name]

    def hex(self, value: object, nbytes: int, name: str) -> bytes:
        if not isinstance(value, str) or len(value) != 2 * nbytes or not re.fullmatch(r"[0-9a-f]*", value):
            raise SecAggError(f"bad field: {self.stage} {name} is {repr(value)[:40]}, "
                              f"expected {nbytes} bytes as lowercase hex")
        return bytes.fromhex(value)

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.raw(name)
        if type(value) is not int or not low <= value <= high:
            raise self.fail(name, f"an integer in {low}..{high}")
        return value

    def ids(self, value: object, name: str) -> list[str]:
        if (not isinstance(value, list) or len(value) > MAX_DEVICES or len(set(map(str, value))) != len(value)
                or not all(isinstance(d, str) and _DEVICE_ID.fullmatch(d) for d in value)):
            raise SecAggError(f"bad field: {self.stage} {name} must be a list of at most {MAX_DEVICES} "
                              "distinct device ids")
        return value

    def keyed(self, name: str, nbytes: int) -> dict[str, bytes]:
        value = self.raw(name)
        if not isinstance(value, dict):
            raise self.fail(name, "an object: device id -> hex")
        self.ids(list(value), name)
        return {k: self.hex(v, nbytes, f"{name}[{k!r}]") for k, v in value.items()}


def _advertise(f: _Fields, _: np.ndarray | None, source: dict | None = None) -> Advertise:
    values = [f.hex(f.raw(n, source), crypto.KEY_BYTES, n) for n in ("c_pk", "s_pk", "b_commit")]
    fields = f.fields if source is None else source
    signature = f.hex(fields["signature"], SIGNATURE_BYTES, "signature") if "signature" in fields else b""
    return Advertise(values[0], values[1], values[2], signature)


def _roster(f: _Fields, _: np.ndarray | None) -> Roster:
    clip = f.raw("clip")
    if not isinstance(clip, (int, float)) or isinstance(clip, bool):
        raise f.fail("clip", "a number > 0")
    fixed = FixedPoint(float(clip), f.integer("weight_cap", 1, 2**20), f.integer("max_devices", 1, 2**20))
    entries = f.raw("devices")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise f.fail("devices", "a list of objects")
    ids = f.ids([e.get("id") for e in entries], "devices ids")
    if ids != sorted(ids):
        raise f.fail("devices", "members sorted by id")
    members = tuple(Member(i, _advertise(f, None, e)) for i, e in zip(ids, entries))
    params = Params(f.integer("threshold", 1, MAX_DEVICES), f.integer("size", 1, 2**31 - 2), fixed)
    return Roster(params, members)


def _masked(f: _Fields, masked: np.ndarray | None) -> Masked:
    if not isinstance(masked, np.ndarray) or masked.dtype != np.uint32 or masked.ndim != 1:
        raise SecAggError("bad array: the masked vector must be 1-D uint32")
    return Masked(masked)


_READERS: dict[str, Callable[[_Fields, np.ndarray | None], Stage]] = {
    "advertise": _advertise,
    "roster": _roster,
    "share": lambda f, _: Shares(f.keyed("sealed", SEALED_BYTES)),
    "ciphertexts": lambda f, _: Ciphertexts(f.keyed("sealed", SEALED_BYTES)),
    "masked": _masked,
    "survivors": lambda f, _: Survivors(tuple(f.ids(f.raw("devices"), "devices"))),
    "unmask": lambda f, _: Unmask(f.keyed("b_shares", shamir.SHARE_BYTES), f.keyed("s_shares", shamir.SHARE_BYTES)),
}
