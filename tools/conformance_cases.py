"""The accepted cases of the conformance vectors: a bundle, messages, chunks, deltas, codecs.

Each function returns JSON-ready dicts made by the reference code (device/protocol); how values
are written down (hex of little-endian bytes, exact values) is the first section. Assembled by
tools/make_conformance.py; the refusals are tools/conformance_refusals.py.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeftl.device.protocol import chunks, messages, wire
from edgeftl.device.protocol.codecs import Encoded, parse_codec
from edgeftl.device.protocol.manifest import Adapter, GraphInputs, Manifest, Quantization, TrainableParam
from edgeftl.device.protocol.messages import ErrorReply, Global, Status, Task, Update

PREFIX = "edgeftl/conformance"
RUN = "conf-run-1"
DEVICE = "dev-3"
MAX_BYTES = 1 << 20  # the message limit every case is read with, unless it names its own


# ---- how values are written down ------------------------------------------------------------


def f32(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def vector_form(vector: np.ndarray) -> dict:
    """A float32 vector: its little-endian bytes (the bits to compare) and its exact values."""
    v = f32(vector)
    return {"size": int(v.size), "hex": v.astype("<f4").tobytes().hex(), "values": [float(x) for x in v]}


def sparse_form(vector: np.ndarray) -> dict:
    """A long float32 vector that is +0.0 except at a few positions: [index, float32 hex] pairs."""
    v = f32(vector)
    return {"size": int(v.size), "nonzero": [[int(i), v[i:i + 1].astype("<f4").tobytes().hex()]
                                             for i in np.flatnonzero(v)]}


def array_form(name: str, array: np.ndarray) -> dict:
    a = np.asarray(array)
    values = [float(x) if a.dtype.kind == "f" else int(x) for x in a.reshape(-1)]
    return {"name": name, "dtype": a.dtype.newbyteorder("<").str if a.itemsize > 1 else a.dtype.str,
            "shape": list(a.shape), "hex": a.astype(a.dtype.newbyteorder("<")).tobytes().hex(), "values": values}


def header_of(payload: bytes) -> dict:
    """The header as on the wire, without the two fields the layout writes (arrays, body_sha256)."""
    return wire.decode_message(payload, MAX_BYTES)[0]


def reason_of(error: Exception) -> str:
    return str(error).split(":")[0]


# ---- the bundle the messages belong to ------------------------------------------------------


def manifest() -> Manifest:
    """A tiny classify bundle whose trainable vector is a 3 x 6 head weight and its bias: 21 values."""
    return Manifest(
        model_id="conformance-tiny", model_type="bert", task="classify", labels=["neg", "neu", "pos"],
        max_seq_len=16, adapter=Adapter("head", 0, 0.0, [], 1),
        quantization=Quantization("none", 32, 0, {}), num_blocks=2, first_trainable_block=0, hidden_size=6,
        trainable=[TrainableParam("classifier.weight", [3, 6], "float32", 0),
                   TrainableParam("classifier.bias", [3], "float32", 18)],
        inputs=GraphInputs(["input_ids", "attention_mask", "labels", "loss_weight"], [], 0),
        files={}, built_with={"edgeftl": "conformance"})


MANIFEST_TEXT = manifest().to_json()
BUNDLE = hashlib.sha256(MANIFEST_TEXT.encode()).hexdigest()
N = manifest().trainable_count


def manifest_case() -> dict:
    m = manifest()
    return {"manifest_json": MANIFEST_TEXT, "bundle_sha256": BUNDLE, "size": N,
            "trainable": [{"name": p.name, "shape": p.shape, "offset": p.offset, "size": p.size} for p in m.trainable]}


def normals(seed: int, n: int, scale: float) -> np.ndarray:
    """Deterministic test values: NumPy's legacy RandomState stream is frozen across versions."""
    return f32(np.random.RandomState(seed).standard_normal(n) * scale)


# ---- messages -------------------------------------------------------------------------------


def encoded(spec: str, vector: np.ndarray) -> Encoded:
    return parse_codec(spec).encode(vector)


# A device's card (PROTOCOL.md section 6.4) as the Python device sends it after round 4.
CARD: dict[str, str | int | float] = {
    "platform_machine": "aarch64", "platform_python": "3.11.2", "onnxruntime": "1.32.0",
    "edgeftl_version": "0.3.0+g0123456789ab", "bundle_sha256": BUNDLE, "package_id": "0123456789abcdef",
    "started": 1767225600, "peak_rss_mib": 316.0, "rounds_done": 5, "last_round": 4}


def typed_messages() -> list[tuple[str, str, messages.Message]]:
    """(name, place it is published on, message): every kind, optional fields set and unset."""
    delta = encoded("int8:8", normals(3, N, 0.01))
    metrics = {"samples": 212, "first_loss": 1.0986, "last_loss": 0.41, "train_time_s": 38.2, "peak_rss_mib": 316.0,
               "rss_mib": 301.5, "bytes_down": 300402, "update_bytes": 84, "platform_machine": "aarch64",
               "platform_system": "Linux", "platform_release": "6.1.0-rpi7", "platform_python": "3.11.2",
               "platform_cpu_count": 4, "platform_total_memory_mib": 3796.2}
    return [
        ("task_steps", "task", Task(RUN, 4, BUNDLE, ("dev-0", DEVICE, "dev-7"), 120.0, 0.001, "topk:0.25+int8:8",
                                    None, 20, 16)),
        ("task_epochs", "task", Task(RUN, 0, BUNDLE, (DEVICE,), 30.0, 0.0005, "none", 2, None, 8)),
        ("global_initial", "global", Global(RUN, -1, BUNDLE, encoded("none", normals(1, N, 0.1)))),
        ("global_full", "global", Global(RUN, 3, BUNDLE, encoded("none", normals(2, N, 0.1)))),
        ("global_delta", "delta", Global(RUN, 4, BUNDLE, delta, 3, messages.params_sha256(
            messages.apply_delta(normals(2, N, 0.1), parse_codec(delta.codec).decode(delta))))),
        ("update_topk_int8", "update", Update(RUN, 4, BUNDLE, DEVICE, 212, 17,
                                              encoded("topk:0.25+int8:8", normals(4, N, 0.01)), metrics)),
        ("update_none", "update", Update(RUN, 5, BUNDLE, DEVICE, 1, 18, encoded("none", normals(5, N, 0.01)), {})),
        ("error_reply", "update", ErrorReply(RUN, 4, BUNDLE, DEVICE, "out_of_memory",
                                             "RuntimeException: Failed to allocate memory for requested buffer")),
        ("status_online", "status", Status(DEVICE, True)),
        ("status_offline", "status", Status(DEVICE, False)),
        ("status_online_card", "status", Status(DEVICE, True, CARD)),
        ("status_will_card", "status", Status(DEVICE, False, {**CARD, "will": 1})),
        ("task_async", "task", Task(RUN, 7, BUNDLE, (DEVICE,), 300.0, 0.002, "int8:8", None, 5, 16, "async")),
        # last, so the refusals' indexes into this list stay as they were
        ("task_start_sha256", "task", Task(RUN, 0, BUNDLE, (DEVICE,), 30.0, 0.002, "sign:256", None, 5, 16,
                                           start_sha256=messages.params_sha256(normals(1, N, 0.1)))),
        # a coordinator that reads the compact framing (section 4.2), and replies in it (COMPACT)
        ("task_framing", "task", Task(RUN, 5, BUNDLE, (DEVICE,), 30.0, 0.002, "sign:8", None, 5, 16, framing=2)),
        ("update_sign_compact", "update", Update(RUN, 5, BUNDLE, DEVICE, 212, 19,
                                                 encoded("sign:8", normals(6, N, 0.01)), {"last_loss": 0.41})),
        ("error_reply_compact", "update", ErrorReply(RUN, 5, BUNDLE, DEVICE, "train_failed",
                                                     "ValueError: the batch holds no example")),
    ]


COMPACT = ("update_sign_compact", "error_reply_compact")  # cases written in message version 2 (section 4.2)


def encode_case(name: str, message: messages.Message) -> bytes:
    """A case's bytes, in the message version the case is written in."""
    return messages.encode(message, version=wire.COMPACT_VERSION if name in COMPACT else wire.FORMAT_VERSION)


def message_case(name: str, place: str, payload: bytes, canonical: bool = True) -> dict:
    """A message's bytes and its decoded form; `canonical`: the reference encoder writes exactly these bytes."""
    message = messages.decode(payload, MAX_BYTES)
    _, arrays = wire.decode_message(payload, MAX_BYTES)
    case = {"name": name, "place": place, "canonical": canonical, "version": payload[4], "hex": payload.hex(),
            "header": header_of(payload),
            "arrays": [array_form(k, a) for k, a in arrays.items()]}
    if isinstance(message, (Global, Update)):
        case["vector"] = vector_form(messages.vector_of(message, N))
    return case


def message_cases() -> list[dict]:
    cases = [message_case(name, place, encode_case(name, m)) for name, place, m in typed_messages()]
    # What a reader must take although the reference writer never writes it: an unknown field
    # (ignored), a float field written as an integer, an optional field left out instead of null.
    header = {**header_of(messages.encode(typed_messages()[0][2])), "priority": 3, "deadline_s": 120}
    del header["epochs"]
    cases.append(message_case("task_lenient_form", "task", wire.encode_message(header, {}), canonical=False))
    return cases


def status_text_cases() -> list[dict]:
    return [{"name": f"status_text_{s}", "hex": s.encode().hex(), "device_id": DEVICE, "online": s == "online"}
            for s in messages.STATUS_STATES]


# ---- chunks ---------------------------------------------------------------------------------


def chunk_case(name: str, topic: str, payload: bytes, max_chunk: int, message_id: str) -> dict:
    frames = chunks.split(payload, max_chunk, message_id)
    return {"name": name, "topic": topic, "max_chunk": max_chunk, "message_id": message_id,
            "payload_hex": payload.hex(),
            "frames": [{"topic": f"{topic}/_c/{i}", "hex": f.hex()} for i, f in enumerate(frames)]}


def chunk_cases() -> list[dict]:
    example = wire.encode_message({"round": 1}, {"values": f32([1.0, -2.0])})  # PROTOCOL.md section 4
    update = messages.encode(Update(RUN, 5, BUNDLE, DEVICE, 3, 19, encoded("none", normals(6, N, 0.01)), {}))
    full = messages.encode(Global(RUN, 5, BUNDLE, encoded("none", normals(7, N, 0.1))))
    return [chunk_case("single_chunk", f"{PREFIX}/global", example, 1024, "m1"),
            chunk_case("update_in_chunks", f"{PREFIX}/update/{DEVICE}", update, 256, "m1"),
            chunk_case("global_in_chunks", f"{PREFIX}/global", full, 300, "0123456789abcdef0123456789abcdef")]


# ---- global deltas, applied -----------------------------------------------------------------


def exact_decode(spec: str, arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The delta with every product code x scale kept exact (float64): what a reader computes when
    it fuses decoding and adding, or adds in float64 and rounds once. Only to show that doing so
    changes bits (`fused_mismatches`); the protocol's arithmetic is `messages.apply_delta`'s."""
    codec = parse_codec(spec)
    if spec.startswith("topk:"):
        index = (np.cumsum(arrays["gaps"].astype(np.int64)) if "gaps" in arrays else arrays["index"].astype(np.int64))
        out = np.zeros(n)
        out[index] = exact_decode(codec.inner.spec, {k[2:]: a for k, a in arrays.items() if k.startswith("v.")},
                                  index.size)
        return out
    if not spec.startswith("int"):
        return codec.decode(Encoded(spec, n, arrays)).astype(np.float64)
    codes = arrays["codes"].astype(np.int64)
    if spec.startswith("int4"):
        codes = np.stack([codes % 16, codes // 16], axis=-1).reshape(-1) - 8
    block = codec.block
    return codes[:n] * np.repeat(arrays["scale"].astype(np.float64), block)[:n]


def delta_case(name: str, spec: str, seed: int, negative_zero: int | None = None) -> dict:
    """A reference vector, a global delta message against it, and the float32 result. For codecs
    that multiply, the first seed whose fused result differs somewhere is taken."""
    reference = normals(seed, N, 0.1)
    if negative_zero is not None:
        reference[negative_zero] = -0.0  # + a +0.0 delta element gives +0.0: add every element
    for attempt in range(seed, seed + 1000):
        payload = encoded(spec, normals(attempt + 100, N, 0.01))
        delta = parse_codec(spec).decode(payload)
        result = messages.apply_delta(reference, delta)
        fused = (reference.astype(np.float64) + exact_decode(spec, payload.arrays, N)).astype(np.float32)
        mismatches = [int(i) for i in np.flatnonzero(fused.view(np.uint32) != result.view(np.uint32))]
        if mismatches or "int" not in spec:
            break
    message = Global(RUN, 4, BUNDLE, payload, 3, messages.params_sha256(result))
    return {"name": name, "codec": payload.codec, "reference": vector_form(reference),
            "message_hex": messages.encode(message).hex(), "delta": vector_form(delta), "result": vector_form(result),
            "params_sha256": messages.params_sha256(result), "fused_mismatches": mismatches}


def delta_cases() -> list[dict]:
    return [delta_case("delta_none", "none", 10), delta_case("delta_fp16", "fp16", 11),
            delta_case("delta_int8", "int8:8", 12), delta_case("delta_int4", "int4:8", 13),
            delta_case("delta_topk_int8", "topk:0.25+int8:8", 14, negative_zero=0)]


# ---- codecs ---------------------------------------------------------------------------------


def codec_case(name: str, spec: str, vector: npt.ArrayLike, arrays: dict[str, np.ndarray] | None = None) -> dict:
    """A vector, the arrays the reference encoder makes of it (or, with `arrays`, arrays only a
    decoder must take), and what they decode to."""
    codec = parse_codec(spec)
    v = f32(vector)
    made = arrays if arrays is not None else codec.encode(v).arrays
    decoded = codec.decode(Encoded(codec.spec, v.size, made))
    form = sparse_form if v.size > 1000 else vector_form
    return {"name": name, "spec": spec, "normalised": codec.spec, "encoder": arrays is None, "input": form(v),
            "arrays": [array_form(k, a) for k, a in made.items()], "decoded": form(decoded)}


def codec_cases() -> list[dict]:
    far = np.zeros(70_000, np.float32)
    far[[5, 69_999]] = [1.0, 2.0]  # a gap of 69,994 does not fit uint16: positions go as uint32 index
    return [
        codec_case("none", "none", normals(20, 5, 1.0)),
        codec_case("fp16", "fp16", [0.1, -0.0, 1e-6, 70000.0, -65519.0, 3.0, 2.0 ** -24]),
        codec_case("int8_default_block", "int8", normals(21, 10, 1.0)),
        # block 0 random, block 1 all zero (scale 1), block 2 short, with ties rounding half to even
        codec_case("int8_blocks", "int8:8", [*normals(22, 8, 1.0), *[0.0] * 8, 127.0, 2.5, -3.5]),
        codec_case("int4_odd", "int4:8", [*normals(23, 8, 1.0), 7.0, 0.5, 1.5, -2.5, -7.0]),
        codec_case("int4_default_block", "int4", normals(24, 9, 1.0)),
        codec_case("topk_half_even_down", "topk:0.25", normals(25, 10, 1.0)),  # k = round(2.5) = 2
        codec_case("topk_half_even_up", "topk:0.25+fp16", normals(26, 14, 1.0)),  # k = round(3.5) = 4
        codec_case("topk_int8", "topk:0.3+int8:8", normals(27, 21, 1.0)),  # k = round(6.3) = 6
        codec_case("topk_int4", "topk:0.2+int4:8", normals(28, 17, 1.0)),  # k = 3: odd, one padding nibble
        codec_case("topk_all", "topk:1+int8:8", normals(29, 9, 1.0)),  # k = n
        codec_case("topk_at_least_one", "topk:0.01", normals(30, 10, 1.0)),  # round(0.1) = 0, k = 1
        codec_case("topk_index_positions", "topk:0.00003", far),  # k = round(2.1) = 2
        # sign: bit 1 for x >= 0 (-0.0 too), first value in the high bit; the short last block's scale is the
        # mean over its own 3 values; block 1 all zero (scale 0, every bit 1)
        codec_case("sign_blocks", "sign:8", [*normals(31, 8, 1.0), *[0.0] * 8, -0.0, 2.5, -3.5]),
        codec_case("sign_default_block", "sign", normals(32, 9, 1.0)),
        codec_case("topk_sign", "topk:0.3+sign:8", normals(33, 21, 1.0)),  # k = 6: 6 bits in one byte
        codec_case("topk_index_small_gaps", "topk:0.25", [0, 4.0, 0, 0, 0, 0, -1.0, 0],
                   {"index": np.array([1, 6], np.uint32), "v.values": f32([4.0, -1.0])}),
    ]
