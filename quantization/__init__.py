"""Weight-only quantization of the frozen backbone (host side: numpy, torch, onnx).

- `schemes`: `QuantScheme` ("none" | "int8" | "int4"), the stage's config.
- `int8`, `int4`: the numpy codecs; their docstrings define the stored layouts (codes, scales and
  nibble packing are `edgeftl.device.protocol.blockquant`'s, shared with the update codecs).
- `modules`: `QuantLinear` / `QuantEmbedding`, torch modules that dequantize in forward so
  the exported training graph keeps int8 / packed uint8 initializers.
- `report`: bytes and errors per tensor and in total.
- `ort_int`: ONNX Runtime integer kernels for the inference-only lower backbone.
- `bnb`: bitsandbytes NF4 / int8 torch models (evaluation, CUDA boards); imports lazily.
"""

from edgeftl.device.protocol.blockquant import pack_nibbles, unpack_nibbles

from .bnb import BNB_SCHEMES, bnb_config, bnb_unavailable_reason, load_bnb_model
from .int4 import dequantize_int4, quantize_int4
from .int8 import dequantize_int8, quantize_int8
from .modules import QuantEmbedding, QuantLinear, quantize_module_
from .ort_int import quantize_onnx_inference
from .report import format_report, model_report, tensor_report
from .schemes import SCHEMES, QuantScheme, parse_scheme

__all__ = [
    "BNB_SCHEMES",
    "SCHEMES",
    "QuantEmbedding",
    "QuantLinear",
    "QuantScheme",
    "bnb_config",
    "bnb_unavailable_reason",
    "dequantize_int4",
    "dequantize_int8",
    "format_report",
    "load_bnb_model",
    "model_report",
    "pack_nibbles",
    "parse_scheme",
    "quantize_int4",
    "quantize_int8",
    "quantize_module_",
    "quantize_onnx_inference",
    "tensor_report",
    "unpack_nibbles",
]
