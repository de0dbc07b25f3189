"""Dense codecs: every value is sent. fp32 (none), fp16, and block-scaled int8 / int4."""

from __future__ import annotations

import numpy as np

from edgeftl.device.protocol import blockquant
from edgeftl.device.protocol.codecs.base import Codec, CodecError, Encoded, as_vector, require

# Decoding pads the last block, so the block bounds what a tiny hostile payload can make a reader
# allocate (int8:100000000 with one value used to cost ~800 MB).
MIN_BLOCK, MAX_BLOCK = 8, 65536


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

    The layout is `device/protocol/blockquant.py`'s, with `max|block| / L` scales: int8 codes in
    [-127, 127], 1 byte each; int4 codes in [-7, 7], two per byte. The last block's padding is
    not sent. Bytes: ceil(size * bits / 8) + 4 * ceil(size / block).
    """

    def __init__(self, bits: int, block: int = 256) -> None:
        if bits not in blockquant.LEVELS:
            raise CodecError(f"block quantization supports 4 or 8 bits, got {bits}")
        if not MIN_BLOCK <= block <= MAX_BLOCK or block % 2:
            raise CodecError(f"quantization block must be an even number in {MIN_BLOCK}..{MAX_BLOCK}, got {block}")
        self.bits, self.block = bits, block
        self.spec = f"int{bits}:{block}"

    def encode(self, vector: np.ndarray) -> Encoded:
        v = as_vector(vector)
        padded = np.zeros(blockquant.padded_size(v.size, self.block), dtype=np.float32)
        padded[: v.size] = v
        grid = padded.reshape(-1, self.block)  # (blocks, block), float32 arithmetic throughout
        scale = blockquant.block_scales(grid, self.bits)
        codes = blockquant.block_codes(grid, scale, self.bits).reshape(-1)
        if self.bits == 4:
            codes = blockquant.pack_nibbles(codes)
        return Encoded(self.spec, v.size, {"codes": codes[: self._stored(v.size)], "scale": scale.astype(np.float32)})

    def _stored(self, size: int) -> int:
        return (size + 1) // 2 if self.bits == 4 else size

    def decode(self, encoded: Encoded) -> np.ndarray:
        padded = blockquant.padded_size(encoded.size, self.block)
        code_type = np.uint8 if self.bits == 4 else np.int8
        require(encoded, {"codes": (code_type, self._stored(encoded.size)),
                          "scale": (np.float32, padded // self.block)})
        scale = encoded.arrays["scale"]
        if not np.isfinite(scale).all():
            raise CodecError(f"{self.spec} payload has non-finite scales")
        codes = np.zeros(self._stored(padded), dtype=code_type)
        codes[: encoded.arrays["codes"].size] = encoded.arrays["codes"]
        if self.bits == 4:
            codes = blockquant.unpack_nibbles(codes)
        return blockquant.dequantize(codes.reshape(-1, self.block), scale).reshape(-1)[: encoded.size]
