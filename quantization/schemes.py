"""Which weight-only quantization a frozen backbone gets: the one config of this stage.

A scheme names how each frozen weight is stored, not how it is computed with: every scheme
dequantizes to fp32 before the matmul (torch modules in `modules.py`) or uses an ONNX Runtime
integer kernel (inference-only graphs in `ort_int.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeftl.device.protocol.manifest import QUANT_SCHEMES

# "none": fp32 weights (4 bytes each); "int8": 1 byte per weight plus one fp32 scale per row;
# "int4": half a byte per weight plus one fp32 scale per `block_size` weights of a row. The
# names are the manifest's (a bundle records its scheme).
SCHEMES: tuple[str, ...] = QUANT_SCHEMES

# Smallest block: 8 nibbles pack into 4 whole bytes, and a block this small already spends
# 4 bytes of scale per 4 bytes of weights, so smaller blocks would gain nothing.
MIN_BLOCK_SIZE = 8


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only quantization scheme of the frozen backbone.

    Attributes:
        name: One of `SCHEMES`: "none", "int8" (symmetric, per output row) or "int4"
            (symmetric, per block of `block_size` values along a row).
        block_size: Values per int4 scale along the input (or hidden) dimension; a power
            of two >= 8. Validated for every scheme so that a config stays valid when only
            its name is changed; ignored by "none" and "int8".
    """

    name: str
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.name!r}; accepted: {', '.join(SCHEMES)}")
        # bool is an int subclass; True as a block size is a config mistake, not 1.
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool):
            raise ValueError(f"block_size must be an int, got {self.block_size!r}")
        if self.block_size < MIN_BLOCK_SIZE or self.block_size & (self.block_size - 1):
            raise ValueError(
                f"block_size {self.block_size!r} is invalid; accepted: a power of two >= {MIN_BLOCK_SIZE}"
            )

    @property
    def bits(self) -> int:
        """Bits stored per weight value (32 for "none")."""
        return {"none": 32, "int8": 8, "int4": 4}[self.name]


def parse_scheme(name: str, block_size: int = 32) -> QuantScheme:
    """Build a validated scheme from a CLI or manifest string.

    Args:
        name: Scheme name, case-insensitive, surrounding spaces ignored.
        block_size: int4 block size (see `QuantScheme`).

    Returns:
        The validated `QuantScheme`.

    Raises:
        ValueError: If the name is not one of `SCHEMES` or the block size is invalid.
    """
    if not isinstance(name, str):
        raise ValueError(f"scheme name must be a string, got {name!r}")
    return QuantScheme(name=name.strip().lower(), block_size=block_size)
