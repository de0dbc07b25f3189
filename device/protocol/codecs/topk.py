"""Top-k sparsification: send only the largest-magnitude fraction of the values.

What is not sent is not lost when the sender keeps it as error feedback (see feedback.py): it is
added to the next round's update, so every coordinate eventually gets through (Stich et al.,
"Sparsified SGD with Memory", 2018; Karimireddy et al., "Error Feedback Fixes SignSGD", 2019).
Positions go as uint16 gaps (first position, then differences; 2 bytes each) when every gap
fits, else as uint32 positions; the kept values go through an inner dense codec.
"""

from __future__ import annotations

import numpy as np

from edgeftl.device.protocol.codecs.base import Codec, CodecError, Encoded, as_vector, require


class TopKCodec(Codec):
    """Keep the `fraction` largest |values| (at least one), encode them with `inner`."""

    def __init__(self, fraction: float, inner: Codec) -> None:
        if not 0.0 < fraction <= 1.0:
            raise CodecError(f"top-k fraction must be in (0, 1], got {fraction}")
        # k comes from the fraction as the spec writes it (%g), on both sides: from the unrounded
        # one, topk:0.12345678 at n = 1e7 sent 1,234,568 positions where readers expect 1,234,570.
        self.spec = f"topk:{fraction:g}+{inner.spec}"
        self.fraction, self.inner = float(f"{fraction:g}"), inner

    def count(self, size: int) -> int:
        return max(1, round(size * self.fraction))

    def encode(self, vector: np.ndarray) -> Encoded:
        v = as_vector(vector)
        k = min(v.size, self.count(v.size))
        index = np.argpartition(np.abs(v), v.size - k)[v.size - k:]
        index = np.sort(index).astype(np.int64)
        inner = self.inner.encode(v[index])
        gaps = np.diff(index, prepend=0)
        fits = gaps.max(initial=0) < 65536
        positions = {"gaps": gaps.astype(np.uint16)} if fits else {"index": index.astype(np.uint32)}
        return Encoded(self.spec, v.size, {**positions, **{f"v.{name}": a for name, a in inner.arrays.items()}})

    def decode(self, encoded: Encoded) -> np.ndarray:
        k = min(encoded.size, self.count(encoded.size))
        outer = Encoded(encoded.codec, encoded.size,
                        {n: a for n, a in encoded.arrays.items() if not n.startswith("v.")})
        if "gaps" in encoded.arrays:
            require(outer, {"gaps": (np.uint16, k)})
            index = np.cumsum(encoded.arrays["gaps"].astype(np.int64))
            if k > 1 and not (encoded.arrays["gaps"][1:] > 0).all():
                raise CodecError(f"{self.spec} payload repeats a position (zero gap)")
        else:
            require(outer, {"index": (np.uint32, k)})
            index = encoded.arrays["index"].astype(np.int64)
            if k > 1 and not (np.diff(index) > 0).all():
                raise CodecError(f"{self.spec} payload has unsorted or repeated indices")
        if k and int(index.max()) >= encoded.size:
            raise CodecError(f"{self.spec} payload has a position beyond the vector's {encoded.size} values")
        inner = Encoded(self.inner.spec, k,
                        {name[2:]: a for name, a in encoded.arrays.items() if name.startswith("v.")})
        out = np.zeros(encoded.size, dtype=np.float32)
        out[index] = self.inner.decode(inner)
        return out
