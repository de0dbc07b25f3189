"""Architecture families: how to run a pretrained backbone block by block.

Each family exposes the same small surface (embed, blocks, run_block, finish) so the task
heads and the frozen-lower / trainable-upper split never see architecture details. We call
the transformer blocks ourselves with an additive attention mask we build, instead of the
model's own forward: transformers' mask utilities break TorchScript tracing for Llama
(`unordered_map::at`, see shared FACTS), and driving the blocks directly is also what lets
the build cut the stack at any block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Additive mask value for padded / future positions; finite so softmax never sees -inf - -inf.
MASK_VALUE = -1e9


@dataclass(frozen=True)
class Family:
    """Architecture family of a Hugging Face `model_type`."""

    name: str  # "bert" | "llama"
    attention_targets: tuple[str, ...]  # default LoRA targets: query and value projections, as in the LoRA paper
    causal: bool


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", ("query", "value"), causal=False),
    "llama": Family("llama", ("q_proj", "v_proj"), causal=True),
}
# Hugging Face model_type -> family. Encoders of the BERT family, decoders of the Llama family.
MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


class Backbone(nn.Module):
    """A pretrained transformer split into embeddings, blocks and a final stage."""

    family: Family

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) int64 -> (batch, seq, hidden) float32."""
        raise NotImplementedError

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> dict:
        """Per-forward tensors every block needs (masks, rotary tables), from the mask."""
        raise NotImplementedError

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (decoders); identity for encoders."""
        return hidden


def _padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    # (batch, seq) 1/0 -> (batch, 1, 1, seq) additive
    keep = attention_mask[:, None, None, :].to(torch.float32)
    return (1.0 - keep) * MASK_VALUE


class BertBackbone(Backbone):
    family = FAMILIES["bert"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # transformers BertModel

    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # token_type_ids = 0: single-segment inputs.
        return self.model.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> dict:
        return {"mask": _padding_mask(attention_mask)}

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.blocks()[index](hidden, attention_mask=ctx["mask"])[0]


class LlamaBackbone(Backbone):
    family = FAMILIES["llama"]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # transformers LlamaModel (or a same-shaped decoder)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def context(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> dict:
        seq = attention_mask.shape[1]
        # Right padding: positions count real tokens from 0.
        position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        future = torch.triu(torch.ones(seq, seq, dtype=torch.float32), diagonal=1) * MASK_VALUE
        mask = future[None, None, :, :] + _padding_mask(attention_mask)
        rotary = self.model.rotary_emb(hidden, position_ids)
        return {"mask": mask, "position_ids": position_ids, "rotary": rotary}

    def run_block(self, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        out = self.blocks()[index](
            hidden,
            attention_mask=ctx["mask"],
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["rotary"],
        )
        return out[0] if isinstance(out, tuple) else out

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)


BACKBONES: dict[str, type[Backbone]] = {"bert": BertBackbone, "llama": LlamaBackbone}
