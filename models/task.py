"""Exportable task models: what the training graph and the frozen lower graph compute."""

from __future__ import annotations

import torch
from torch import nn

from edgeftl.device.protocol.manifest import CLASSIFY, TASKS
from edgeftl.models.adapters.head import (
    LM_HEAD_CHUNKS,
    ChunkedLMHead,
    MeanPoolClassifier,
    causal_lm_loss,
    chunked_causal_lm_loss,
    classification_loss,
)
from edgeftl.models.families import Backbone


class UpperModel(nn.Module):
    """Blocks [first_block:] + head + loss: the part that goes into the ORT training graph.

    Inputs are token ids when first_block == 0, else the frozen lower stack's hidden states.
    `loss_weight` (float32 scalar) multiplies the loss: a device that splits a batch into
    micro-batches passes each one's share (its samples / the batch's, or tokens for causal-LM),
    so the accumulated gradient equals the full batch's exactly while activations are only
    held for one micro-batch. Pass 1.0 otherwise. Returns (loss, logits).

    A causal LM's head is a `ChunkedLMHead` (`make_head`): the loss is computed one vocabulary
    block at a time and `logits` concatenates the blocks. The training graph drops `logits`, so
    its (batch, seq, vocabulary) tensor exists only in the evaluation graph.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, task: str, first_block: int) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
        self.backbone = backbone
        self.head = head
        self.task = task
        self.first_block = first_block

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                loss_weight: torch.Tensor):
        hidden = self.backbone.embed(inputs) if self.first_block == 0 else inputs
        ctx = self.backbone.context(attention_mask, hidden)
        for index in range(self.first_block, len(self.backbone.blocks())):
            hidden = self.backbone.run_block(index, hidden, ctx)
        hidden = self.backbone.finish(hidden)
        if self.task == CLASSIFY:
            logits = self.head(hidden, attention_mask)
            return classification_loss(logits, labels) * loss_weight, logits
        if isinstance(self.head, ChunkedLMHead):
            blocks = self.head.logit_blocks(hidden)
            loss = chunked_causal_lm_loss(blocks, self.head.offsets, labels)
            return loss * loss_weight, torch.cat(blocks, dim=-1)
        logits = self.head(hidden)
        return causal_lm_loss(logits, labels) * loss_weight, logits


class LowerModel(nn.Module):
    """Embeddings + blocks [:first_block]: frozen, inference-only, run once per sample on device."""

    def __init__(self, backbone: Backbone, first_block: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.first_block = first_block

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embed(input_ids)
        ctx = self.backbone.context(attention_mask, hidden)
        for index in range(self.first_block):
            hidden = self.backbone.run_block(index, hidden, ctx)
        return hidden  # (batch, seq, hidden)


def make_head(task: str, hidden_size: int, num_labels: int, lm_head: nn.Module | None) -> nn.Module:
    if task == CLASSIFY:
        return MeanPoolClassifier(hidden_size, num_labels)
    if lm_head is None:
        raise ValueError("task causal-lm needs a decoder model with an LM head")
    if isinstance(lm_head, nn.Linear):
        # the training loss then never holds (batch, seq, vocabulary) logits
        return ChunkedLMHead(lm_head, min(LM_HEAD_CHUNKS, lm_head.out_features))
    return lm_head
