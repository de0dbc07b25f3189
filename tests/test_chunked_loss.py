"""The causal-LM loss one vocabulary block at a time equals the plain loss, and its bundle never builds full logits.

`ChunkedLMHead` + `chunked_causal_lm_loss` (models/adapters/head.py) replace the LM head and
`causal_lm_loss` in the exported task model so that the training graph can recompute one block
of logits at a time (coordinator/bundler/logits_recompute.py). Loss and gradients must be
those of the plain head and loss (float rounding aside), padding included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeftl.device.protocol.manifest import TRAINING_MODEL
from edgeftl.models.adapters.head import IGNORE_INDEX, ChunkedLMHead, causal_lm_loss, chunked_causal_lm_loss
from edgeftl.models.loading import load_pretrained

from fixtures_build import bundle
from tiny_models import tiny_llama


def _loss_and_grad(loss_fn, hidden: torch.Tensor) -> tuple[float, np.ndarray]:
    hidden = hidden.clone().requires_grad_(True)
    loss = loss_fn(hidden)
    loss.backward()
    return loss.item(), hidden.grad.numpy()


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_chunked_loss_equals_the_plain_loss_and_its_gradient(chunks: int) -> None:
    # Prepare: a random head over 50 words (blocks of unequal size for 3 and 7), padded rows
    torch.manual_seed(0)
    linear = nn.Linear(16, 50, bias=True)
    head = ChunkedLMHead(linear, chunks)
    hidden = torch.randn(3, 9, 16)
    labels = torch.randint(0, 50, (3, 9))
    labels[1, 6:] = IGNORE_INDEX  # a padded tail
    labels[2, :] = torch.tensor([0, 49, 16, 17, 33, 34, 1, 48, 0])  # block edges

    # Execute
    plain = _loss_and_grad(lambda h: causal_lm_loss(linear(h), labels), hidden)
    chunked = _loss_and_grad(lambda h: chunked_causal_lm_loss(head.logit_blocks(h), head.offsets, labels), hidden)

    # Assert: same loss and input gradient; the concatenated blocks are the plain logits
    assert chunked[0] == pytest.approx(plain[0], abs=1e-5)
    np.testing.assert_allclose(chunked[1], plain[1], atol=1e-6)
    torch.testing.assert_close(head(hidden), linear(hidden), atol=1e-6, rtol=0)


def test_a_tiny_llama_head_in_blocks_gives_the_plain_loss(tmp_path: Path) -> None:
    # Prepare: the tiny Llama's LM head (33 words) in 16 blocks, and its final hidden states
    pre = load_pretrained(tiny_llama(tmp_path / "llama"), causal_lm=True)
    head = ChunkedLMHead(pre.lm_head, 16)
    ids = torch.randint(0, 33, (2, 12))
    hidden = torch.randn(2, 12, pre.hidden_size)

    # Execute
    plain = _loss_and_grad(lambda h: causal_lm_loss(pre.lm_head(h), ids), hidden)
    chunked = _loss_and_grad(lambda h: chunked_causal_lm_loss(head.logit_blocks(h), head.offsets, ids), hidden)

    # Assert
    assert chunked[0] == pytest.approx(plain[0], abs=1e-5)
    np.testing.assert_allclose(chunked[1], plain[1], atol=1e-6)


def test_bad_chunk_counts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"chunks must be 1\.\.50"):
        ChunkedLMHead(nn.Linear(4, 50), 51)


def test_the_training_graph_recomputes_logit_blocks_and_never_concatenates_them(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: the tiny Llama int8 causal-LM bundle (the build checked it against ORT Training)
    graph = onnx.load(str(bundle(tmp_path_factory, "llama-int8") / TRAINING_MODEL)).graph

    # Execute
    ops = [node.op_type for node in graph.node]
    copies = [node for node in graph.node if node.name.endswith("_Grad/logits_recompute")]
    blocks = {node.output[0] for node in graph.node if node.op_type == "MatMul"} & {
        node.input[0] for node in graph.node if node.op_type == "ReduceLogSumExp"}
    readers = {node.op_type for node in graph.node for name in node.input if name in blocks}

    # Assert: one recomputed product per vocabulary block, which only the forward loss reads:
    # no Concat of all blocks (the eval graph's logits) and no backward reader holds them
    assert len(copies) == len(blocks) == 16 and all(node.op_type == "FusedMatMul" for node in copies)
    assert readers == {"ReduceLogSumExp", "GatherElements"}
    assert "GatherElementsGrad" not in ops and "ScatterElements" in ops
