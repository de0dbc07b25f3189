"""The signed cases of the conformance vectors (docs/PROTOCOL.md section 4.1): messages signed with
fixed Ed25519 keys, and tampered or wrongly signed ones a reader holding the key must refuse.

Ed25519 signatures are deterministic, so the keys' seeds are in the file: another implementation
can check that it signs to the same bytes, and that it verifies and refuses as the reference does.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeftl.device.protocol import auth, messages, wire

from conformance_cases import DEVICE, MAX_BYTES, typed_messages


def key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"edgeftl conformance {name}".encode()).digest())


def seed_hex(private: Ed25519PrivateKey) -> str:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption()).hex()


def signed_case(name: str, place: str, payload: bytes, signer: str, signed_by: Ed25519PrivateKey,
                trusted: Ed25519PrivateKey) -> dict:
    """`payload` as it arrives at a reader that trusts `trusted`'s key for `signer`: its verdict."""
    message = messages.decode(payload, MAX_BYTES)
    reason = None
    try:
        auth.Keys(trusted={signer: trusted.public_key()}).check(payload, message)
    except messages.MessageError as exc:
        reason = str(exc)
    return {"name": name, "place": place, "signer": signer, "signing_seed_hex": seed_hex(signed_by),
            "public_key": auth.public_key_text(trusted), "hex": payload.hex(), "valid": reason is None,
            "reason": reason}


def signed_cases() -> list[dict]:
    coordinator, device, other = key("coordinator"), key(DEVICE), key("another")
    chosen = {name: (place, m) for name, place, m in typed_messages()
              if name in ("task_steps", "global_delta", "update_topk_int8", "error_reply", "status_online")}
    cases = []
    for name, (place, message) in chosen.items():
        signer = auth.signer_of(message)
        own = coordinator if signer == auth.COORDINATOR else device
        cases.append(signed_case(f"signed_{name}", place, auth.Keys(own).sign(message), signer, own, own))
    task_place, task = chosen["task_steps"]
    good = auth.Keys(coordinator).sign(task)
    flipped_trailer = good[:-1] + bytes([good[-1] ^ 1])
    other_key = auth.Keys(other).sign(task)
    cases += [
        signed_case("signed_task_bad_trailer", task_place, flipped_trailer, auth.COORDINATOR, coordinator, coordinator),
        signed_case("signed_task_other_key", task_place, other_key, auth.COORDINATOR, other, coordinator),
        signed_case("unsigned_task_key_pinned", task_place, messages.encode(task), auth.COORDINATOR, coordinator,
                    coordinator),
    ]
    compact_place, compact = next((place, m) for name, place, m in typed_messages() if name == "update_sign_compact")
    cases.append(signed_case("signed_update_sign_compact", compact_place,
                             auth.Keys(device).sign(compact, wire.COMPACT_VERSION), DEVICE, device, device))
    update_place, update = chosen["update_topk_int8"]
    cases.append(signed_case("signed_update_other_device_key", update_place, auth.Keys(other).sign(update), DEVICE,
                             other, device))
    return cases
