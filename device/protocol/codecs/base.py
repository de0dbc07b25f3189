"""Update codecs: how a float32 vector travels between devices and the coordinator.

A codec turns a flat float32 vector into named numpy arrays (what goes on the wire) and back.
Pure numpy, shared by device and coordinator. Each codec reports the exact bytes of its
arrays; the transport adds its header and counts what it really sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class CodecError(ValueError):
    """A codec spec or an encoded payload that cannot be used."""


@dataclass
class Encoded:
    """A codec's output: the spec that made it, the vector length, and the arrays to send."""

    codec: str
    size: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


class Codec:
    """Base class: `encode` a float32 vector, `decode` it back (lossy or not)."""

    spec: str = ""

    def encode(self, vector: np.ndarray) -> Encoded:
        raise NotImplementedError

    def decode(self, encoded: Encoded) -> np.ndarray:
        raise NotImplementedError

    def roundtrip(self, vector: np.ndarray) -> tuple[Encoded, np.ndarray]:
        encoded = self.encode(vector)
        return encoded, self.decode(encoded)


def as_vector(vector: np.ndarray) -> np.ndarray:
    """A 1-D contiguous float32 view/copy; rejects non-finite values."""
    array = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    if not np.isfinite(array).all():
        raise CodecError("cannot encode a vector holding NaN or Inf")
    return array


def require(encoded: Encoded, names: dict[str, tuple[type, int | None]]) -> None:
    """Check an (untrusted) encoded payload has exactly the named arrays, with the right dtype and
    length: a missing or an extra array is refused."""
    extra = sorted(set(encoded.arrays) - set(names))
    if extra:
        raise CodecError(f"{encoded.codec} payload has unexpected arrays {extra[:4]}; expected {sorted(names)}")
    for name, (dtype, length) in names.items():
        array = encoded.arrays.get(name)
        if array is None:
            raise CodecError(f"{encoded.codec} payload lacks array {name!r}")
        if array.dtype != np.dtype(dtype) or array.ndim != 1:
            raise CodecError(f"{encoded.codec} array {name!r} is {array.dtype}{list(array.shape)}, "
                             f"expected 1-D {np.dtype(dtype)}")
        if length is not None and array.size != length:
            raise CodecError(f"{encoded.codec} array {name!r} has {array.size} values, expected {length}")
