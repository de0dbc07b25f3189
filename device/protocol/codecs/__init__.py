"""Compression codecs for federated updates (uplink) and global parameters (downlink).

Spec strings, as given on the command line and carried in every payload header:
    none | fp16 | int8[:BLOCK] | int4[:BLOCK] | sign[:BLOCK] | topk:FRACTION[+DENSE]
e.g. `topk:0.01+int8` keeps the 1% largest values and sends them as int8 with per-block scales;
`sign` sends every value as 1 bit with a mean-magnitude scale per block.
"""

from __future__ import annotations

from edgeftl.device.protocol.codecs.base import Codec, CodecError, Encoded
from edgeftl.device.protocol.codecs.dense import BlockQuantCodec, Fp16Codec, NoneCodec
from edgeftl.device.protocol.codecs.feedback import ErrorFeedback
from edgeftl.device.protocol.codecs.sign import SignCodec
from edgeftl.device.protocol.codecs.topk import TopKCodec

ACCEPTED = ("none | fp16 | int8[:BLOCK] | int4[:BLOCK] | sign[:BLOCK] | "
            "topk:FRACTION[+none|fp16|int8[:BLOCK]|int4[:BLOCK]|sign[:BLOCK]]")
DEFAULT_BLOCK = 256

__all__ = ["ACCEPTED", "Codec", "CodecError", "Encoded", "ErrorFeedback", "parse_codec"]


def parse_codec(spec: str) -> Codec:
    """Build a codec from its spec string.

    Raises:
        CodecError: naming the bad spec and the accepted forms.
    """
    text = spec.strip().lower()
    try:
        if text.startswith("topk:"):
            head, _, inner = text[5:].partition("+")
            if inner.startswith("topk"):
                raise ValueError("top-k cannot be nested")
            return TopKCodec(float(head), _dense(inner or "none"))
        return _dense(text)
    except (ValueError, CodecError) as exc:
        raise CodecError(f"bad codec spec {spec!r} ({exc}); accepted: {ACCEPTED}") from None


def _dense(text: str) -> Codec:
    name, _, block = text.partition(":")
    if name == "none" and not block:
        return NoneCodec()
    if name == "fp16" and not block:
        return Fp16Codec()
    if name in ("int8", "int4"):
        return BlockQuantCodec(int(name[3]), int(block) if block else DEFAULT_BLOCK)
    if name == "sign":
        return SignCodec(int(block) if block else DEFAULT_BLOCK)
    raise ValueError(f"unknown codec {text!r}")
