"""Dense codecs: every value is sent. fp32 (none), fp16, and block-scaled int8 / int4."""

from __future__ import annotations

import numpy as np

from edgeftl.device.protocol.codecs.base import Codec, CodecError, Encoded, as_vector, require


class NoneCodec(Codec):
    """Uncompressed float32: the reference every other codec is measured against."""

    spec = "none"

    def encode(self, vector: np.ndarray) -> Encoded:
        v = as_vector(vector)
        return Encoded(self.spec, v.size, {"values": v.copy()})

    def decode(self, encoded: Encoded) -> np.ndarray:
        require(encoded, {"values": (np.float32, encoded.size)})
        return encoded.arrays["values"].astype(np.float32, copy=True)


class Fp16Codec(Codec):
    """Half precision: 2 bytes per value, relative error ~5e-4 (values beyond 65504 saturate)."""

    spec = "fp16"

    def encode(self, vector: np.ndarray) -> Encoded:
        v = as_vector(vector)
        return Encoded(self.spec, v.size, {"values": np.clip(v, -65504, 65504).astype(np.float16)})

    def decode(self, encoded: Encoded) -> np.ndarray:
        require(encoded, {"values": (np.float16, encoded.size)})
        return encoded.arrays["values"].astype(np.float32)


class BlockQuantCodec(Codec):
    """Symmetric integer quantization with one float32 scale per block of `block` values.

    int8: codes in [-127, 127], 1 byte each. int4: codes in [-7, 7] stored as code + 8,
    two per byte (low nibble = even index). Bytes: ceil(size * bits / 8) + 4 * ceil(size / block).
    """

    def __init__(self, bits: int, block: int = 256) -> None:
        if bits not in (4, 8):
            raise CodecError(f"block quantization supports 4 or 8 bits, got {bits}")
        if block < 8 or block % 2:
            raise CodecError(f"quantization block must be an even number >= 8, got {block}")
        self.bits, self.block = bits, block
        self.levels = 127 if bits == 8 else 7
        self.spec = f"int{bits}:{block}"

    def encode(self, vector: np.ndarray) -> Encoded:
        v = as_vector(vector)
        blocks = -(-v.size // self.block)
        padded = np.zeros(blocks * self.block, dtype=np.float32)
        padded[: v.size] = v
        grid = padded.reshape(blocks, self.block)
        scale = np.abs(grid).max(axis=1) / self.levels
        scale[scale == 0] = 1.0
        codes = np.clip(np.rint(grid / scale[:, None]), -self.levels, self.levels).astype(np.int8).reshape(-1)
        if self.bits == 4:
            nibbles = (codes + 8).astype(np.uint8)
            codes = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
        # The padding of the last block is not sent.
        codes = codes[: self._stored(v.size)]
        return Encoded(self.spec, v.size, {"codes": codes, "scale": scale.astype(np.float32)})

    def _stored(self, size: int) -> int:
        return (size + 1) // 2 if self.bits == 4 else size

    def decode(self, encoded: Encoded) -> np.ndarray:
        blocks = -(-encoded.size // self.block)
        per_byte = 2 if self.bits == 4 else 1
        code_type = np.uint8 if self.bits == 4 else np.int8
        require(encoded, {"codes": (code_type, self._stored(encoded.size)), "scale": (np.float32, blocks)})
        codes = np.zeros(blocks * self.block // per_byte, dtype=code_type)
        codes[: encoded.arrays["codes"].size] = encoded.arrays["codes"]
        if self.bits == 4:
            values = np.empty(codes.size * 2, dtype=np.int8)
            values[0::2] = (codes & 0x0F).astype(np.int8) - 8
            values[1::2] = (codes >> 4).astype(np.int8) - 8
            codes = values
        scale = encoded.arrays["scale"]
        if not np.isfinite(scale).all():
            raise CodecError(f"{self.spec} payload has non-finite scales")
        out = codes.reshape(blocks, self.block).astype(np.float32) * scale[:, None]
        return out.reshape(-1)[: encoded.size]
