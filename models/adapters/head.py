"""Task heads on top of the backbone's last hidden states."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100  # label value that the causal-LM loss skips (padding)
# The LM head as this many row blocks of the vocabulary (SmolLM2: 49,152 / 16 = 3,072 rows each).
LM_HEAD_CHUNKS = 16


class MeanPoolClassifier(nn.Module):
    """Masked mean pooling + linear layer; sentence-transformers models are trained for mean pooling."""

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (batch, hidden)
        return self.classifier(pooled)  # (batch, num_labels)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; labels are the input ids with padding set to IGNORE_INDEX."""
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX)


class ChunkedLMHead(nn.Module):
    """An LM head (nn.Linear hidden -> vocabulary) as `chunks` linear layers over row blocks of the vocabulary.

    The same weights and the same logits (concatenated): it exists so that the training loss
    (`chunked_causal_lm_loss`) can work one block of the vocabulary at a time, and so that a
    quantized bundle dequantizes one block at a time. Each block is its own nn.Linear, so the
    build quantizes each (int8 per row and int4 per block of a row: the same values as the
    whole head's); a head tied to the embedding table becomes a copy of it.
    """

    def __init__(self, head: nn.Linear, chunks: int = LM_HEAD_CHUNKS) -> None:
        super().__init__()
        rows = head.out_features
        if not 1 <= chunks <= rows:
            raise ValueError(f"LM head chunks must be 1..{rows} (the vocabulary), got {chunks}")
        bounds = [rows * k // chunks for k in range(chunks + 1)]
        self.offsets = bounds[:-1]
        self.parts = nn.ModuleList()
        for start, stop in itertools.pairwise(bounds):
            part = nn.Linear(head.in_features, stop - start, bias=head.bias is not None)
            with torch.no_grad():
                part.weight.copy_(head.weight[start:stop])
                if head.bias is not None:
                    part.bias.copy_(head.bias[start:stop])
            part.requires_grad_(head.weight.requires_grad)
            self.parts.append(part)

    def logit_blocks(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """(batch, seq, hidden) -> one (batch, seq, block rows) tensor per vocabulary block."""
        return [part(hidden) for part in self.parts]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.logit_blocks(hidden), dim=-1)  # (batch, seq, vocabulary)


def chunked_causal_lm_loss(blocks: list[torch.Tensor], offsets: list[int], labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss` of the concatenated blocks, computed one vocabulary block at a time.

    Per position: log-sum-exp over the vocabulary = log-sum-exp of each block's log-sum-exp,
    minus the target's logit, gathered from the block that holds it. Targets are the labels
    shifted left (the last position predicts nothing), so no (batch, seq, vocabulary) tensor is
    sliced or built: the training graph's backward pass recomputes one block's logits at a time
    (coordinator/bundler/logits_recompute.py). Mean over positions whose target is not IGNORE_INDEX.
    """
    ignored = torch.full_like(labels[:, :1], IGNORE_INDEX)
    targets = torch.cat([labels[:, 1:], ignored], dim=1)  # (batch, seq)
    pairs = []
    for logits, start in zip(blocks, offsets):
        rows = logits.shape[-1]
        # keepdim: ORT Training 1.19.2's ReduceLogSumExp gradient writes an invalid Unsqueeze otherwise
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        inside = ((targets >= start) & (targets < start + rows)).to(logits.dtype).unsqueeze(-1)
        index = (targets - start).clamp(0, rows - 1).unsqueeze(-1)
        # One tensor per block holding both of its reductions: the graph then finishes a block
        # (and frees its logits) before it starts the next one.
        pairs.append(torch.cat([lse, torch.gather(logits, -1, index) * inside], dim=-1))  # (batch, seq, 2)
    both = torch.stack(pairs, dim=-2)  # (batch, seq, blocks, 2)
    pick_lse = torch.tensor([1.0, 0.0], dtype=both.dtype)  # a product with 1 and 0 selects exactly
    lse = torch.logsumexp((both * pick_lse).sum(-1), dim=-1, keepdim=True).squeeze(-1)
    target_logit = (both * (1.0 - pick_lse)).sum(dim=(-2, -1))
    valid = (targets != IGNORE_INDEX).to(lse.dtype)
    return ((lse - target_logit) * valid).sum() / valid.sum()
