"""Error feedback: what a lossy codec dropped this round is added to the next round's vector."""

from __future__ import annotations

import numpy as np

from edgeftl.device.protocol.codecs.base import Codec, Encoded, as_vector


class ErrorFeedback:
    """Keeps the compression residual across rounds (on the device for uplink, on the coordinator
    for downlink), so the sum of what was sent tracks the sum of what should have been sent.
    """

    def __init__(self, codec: Codec, size: int) -> None:
        self.codec = codec
        self.residual = np.zeros(size, dtype=np.float32)

    def encode(self, vector: np.ndarray) -> tuple[Encoded, np.ndarray]:
        """Encode vector + residual; return the payload and what the receiver will decode."""
        target = as_vector(vector) + self.residual
        encoded, decoded = self.codec.roundtrip(target)
        self.residual = target - decoded
        return encoded, decoded

    def state(self) -> np.ndarray:
        return self.residual.copy()

    def load(self, residual: np.ndarray) -> None:
        residual = np.asarray(residual, dtype=np.float32).reshape(-1)
        if residual.shape != self.residual.shape or not np.isfinite(residual).all():
            return  # a residual from another bundle or a corrupt file: start from zero
        self.residual = residual.copy()
