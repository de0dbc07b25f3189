"""Top-k sparsification: send only the largest-magnitude fraction of the values.

What is not sent is not lost when the sender keeps it as error feedback (see feedback.py): it is
added to the next round's update, so every coordinate eventually gets through (Stich et al.,
"Sparsified SGD with Memory", 2018; Karimireddy et al., "Error Feedback Fixes SignSGD", 2019).
Indices go as uint32 deltas-free positions; the kept values go through an inner dense codec.
"""

from __future__ import annotations

import numpy as np

from edgeftl.device.codecs.base import Codec, CodecError, Encoded, as_vector, require


class TopKCodec(Codec):
    """Keep the `fraction` largest |values| (at least one), encode them with `inner`."""

    def __init__(self, fraction: float, inner: Codec) -> None:
        if not 0.0 < fraction <= 1.0:
            raise CodecError(f"top-k fraction must be in (0, 1], got {fraction}")
        self.fraction, self.inner = fraction, inner
        self.spec = f"topk:{fraction:g}+{inner.spec}"

    def count(self, size: int) -> int:
        return max(1, int(round(size * self.fraction)))

    def encode(self, vector: np.ndarray) -> Encoded:
        v = as_vector(vector)
        k = min(v.size, self.count(v.size))
        index = np.argpartition(np.abs(v), v.size - k)[v.size - k:]
        index = np.sort(index).astype(np.uint32)
        inner = self.inner.encode(v[index])
        arrays = {"index": index, **{f"v.{name}": a for name, a in inner.arrays.items()}}
        return Encoded(self.spec, v.size, arrays)

    def decode(self, encoded: Encoded) -> np.ndarray:
        k = min(encoded.size, self.count(encoded.size))
        require(encoded, {"index": (np.uint32, k)})
        index = encoded.arrays["index"]
        if k and (int(index.max()) >= encoded.size or (k > 1 and not (np.diff(index.astype(np.int64)) > 0).all())):
            raise CodecError(f"{self.spec} payload has out-of-range or unsorted indices")
        inner = Encoded(self.inner.spec, k, {name[2:]: a for name, a in encoded.arrays.items() if name.startswith("v.")})
        out = np.zeros(encoded.size, dtype=np.float32)
        out[index] = self.inner.decode(inner)
        return out
