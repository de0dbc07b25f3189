"""bitsandbytes-quantized torch models: coordinator-side evaluation and CUDA boards.

This is the torch path (no ONNX): transformers loads the checkpoint through a
`BitsAndBytesConfig` and bitsandbytes swaps the backbone's Linear layers for its own
(`Linear4bit` for NF4, `Linear8bitLt` for int8). torch, transformers and bitsandbytes are
imported inside the functions, so importing `edgeftl.quantization` stays cheap.

bitsandbytes 0.50.2 has a CPU backend: NF4 (with double quantization) and int8 models loaded
and ran forward on this x86 CPU host. Where neither CUDA nor a working CPU backend is present,
`load_bnb_model` raises a RuntimeError saying so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel

BNB_SCHEMES: tuple[str, ...] = ("nf4", "int8")


def _compute_dtype() -> torch.dtype:
    """bfloat16 on CUDA (tensor cores); float32 on CPU, where bfloat16 matmuls are slow or
    missing on the boards this targets."""
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def bnb_config(name: str) -> BitsAndBytesConfig:
    """transformers quantization config for a bitsandbytes scheme.

    Args:
        name: "nf4" (4-bit NormalFloat, double-quantized scales, QLoRA's recipe) or "int8"
            (LLM.int8(): int8 weights, outlier features kept in 16 bit).

    Returns:
        A `transformers.BitsAndBytesConfig`.

    Raises:
        ValueError: If `name` is not one of `BNB_SCHEMES`.
    """
    from transformers import BitsAndBytesConfig

    if name == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_compute_dtype(),
        )
    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown bitsandbytes scheme {name!r}; accepted: {', '.join(BNB_SCHEMES)}")


def bnb_unavailable_reason() -> str | None:
    """Why bitsandbytes cannot quantize here, or None when it can.

    Probes the real kernels (NF4 quantize/dequantize of a small tensor) on CUDA when
    present, else on CPU, rather than trusting version strings.
    """
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except ImportError as exc:  # not installed, or its native library failed to load
        return f"bitsandbytes is not importable ({exc}); install the host extra"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        x = torch.linspace(-1.0, 1.0, 128, device=device)
        q, state = bnbf.quantize_4bit(x, quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
    except Exception as exc:
        return (f"bitsandbytes NF4 kernels fail on {device} ({type(exc).__name__}: {exc}); "
                "a CUDA GPU or a bitsandbytes build with a CPU backend is needed")
    return None


def load_bnb_model(model_dir: str, num_labels: int | None, scheme: str) -> PreTrainedModel:
    """Load a local Hugging Face checkpoint with bitsandbytes-quantized Linear layers.

    Args:
        model_dir: Folder with config and weights; nothing is fetched (`local_files_only`).
        num_labels: Classes of a sequence-classification head
            (AutoModelForSequenceClassification); None loads AutoModelForCausalLM.
        scheme: "nf4" or "int8" (see `bnb_config`).

    Returns:
        The model in eval mode. Layers bitsandbytes leaves unquantized (embeddings, norms,
        the output head) are in the compute dtype (float32 on CPU, bfloat16 on CUDA),
        not transformers' float16 default for quantized loads.

    Raises:
        ValueError: If `scheme` is unknown.
        RuntimeError: If bitsandbytes cannot run here (see `bnb_unavailable_reason`).
    """
    config = bnb_config(scheme)
    reason = bnb_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "quantization_config": config,
        "local_files_only": True,
        "dtype": _compute_dtype(),
    }
    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels, **kwargs)
    return model.eval()
