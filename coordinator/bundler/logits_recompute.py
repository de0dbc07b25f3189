"""Recompute each vocabulary block's logits in the backward pass instead of holding them from the forward.

A causal LM's training loss (models/adapters/head.py `chunked_causal_lm_loss`) reads the LM
head's logits one vocabulary block at a time: Z_k = H W_k^T, its log-sum-exp and the targets'
logits gathered from it. The backward pass reads Z_k again (the log-sum-exp gradient is
dY exp(Z_k - lse_k)), so ORT would keep every block alive from the forward to the backward:
the whole (batch, seq, vocabulary) tensor, 192 MiB at 8 x 128 tokens of a 49,152-word
vocabulary. This pass gives the backward readers of each Z_k a recomputed copy, so the
backward pass holds one block at a time.

The copy is FusedMatMul(alpha=1) where the forward has MatMul (the `attention_recompute.py`
trick: the same product, an op ORT's common-subexpression elimination does not merge back).
It is named as a gradient node (`_Grad`) so that `recompute.py`, run after this pass, also
gives it a recomputed copy of a quantized weight's dequantization: each block's fp32 weight
then exists only while that block is worked on, in the forward and in the backward pass.
"""

from __future__ import annotations

import onnx
from onnx import helper

from edgeftl.coordinator.bundler.attention_recompute import MS_DOMAIN
from edgeftl.coordinator.bundler.recompute import insert_before_backward, is_backward

SUFFIX = "_Grad/logits_recompute"  # a gradient node's name (recompute.is_backward), so its weight is recomputed too
LOSS_READERS = ("ReduceLogSumExp",)  # a MatMul whose output one of these reads is a block of logits


def recompute_logit_blocks(model: onnx.ModelProto) -> int:
    """Give backward readers of each vocabulary block's logits a recomputed copy (in place).

    Returns:
        The number of logit blocks whose backward readers now read a copy.
    """
    graph = model.graph
    forward = [n for n in graph.node if not is_backward(n)]
    loss_inputs = {name for n in forward if n.op_type in LOSS_READERS for name in n.input}
    copies: list[onnx.NodeProto] = []
    for node in forward:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.output[0] not in loss_inputs:
            continue
        readers = [n for n in graph.node if is_backward(n) and node.output[0] in n.input]
        if not readers:
            continue
        copy = f"{node.output[0]}{SUFFIX}"
        copies.append(helper.make_node("FusedMatMul", list(node.input), [copy], name=f"{node.name}{SUFFIX}",
                                       domain=MS_DOMAIN, alpha=1.0))
        for reader in readers:
            reader.input[:] = [copy if name == node.output[0] else name for name in reader.input]
    if copies:
        insert_before_backward(graph, copies)
    return len(copies)
