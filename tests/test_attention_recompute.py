"""Attention probabilities recomputed for the backward pass (coordinator/bundler/attention_recompute.py).

Built through the CLI on the tiny models: by default every backward reader of an attention
softmax reads a recomputed copy; `--keep-attention` leaves the graph as ORT generated it; and
the two train to the same numbers, bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeftl.device.runtime import BundleRuntime

from fixtures_build import bundle, keyword_dataset

BLOCKS = 2  # tests/tiny_models.py


def _graph(folder) -> onnx.GraphProto:
    return onnx.load(str(folder / "training_model.onnx")).graph


def _backward_softmax_inputs(graph: onnx.GraphProto) -> list[str]:
    """The softmax outputs that backward nodes read: those of the softmax gradient, which the
    portable graph spells Y * (dY - sum(dY * Y)) under the gradient node's name."""
    softmax = {n.output[0] for n in graph.node if n.op_type == "Softmax"}
    return sorted({name for n in graph.node if "_Grad" in n.name for name in n.input if name in softmax})


@pytest.mark.parametrize("name", ["bert-int8", "llama-int8"])
def test_backward_pass_reads_recomputed_attention_probabilities(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    graph = _graph(bundle(tmp_path_factory, name))
    forward = {n.output[0] for n in graph.node if n.op_type == "Softmax" and not n.name.endswith("_recompute")}

    # Execute
    read = _backward_softmax_inputs(graph)

    # Assert: one copy per block, and no backward node holds on to a forward softmax output
    assert len(forward) == BLOCKS and len(read) == BLOCKS
    assert all(name.endswith("_recompute") for name in read)
    assert not [n for n in graph.node if "_Grad" in n.name and forward & set(n.input)]


def test_keep_attention_leaves_the_forward_probabilities_to_the_backward_pass(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    graph = _graph(bundle(tmp_path_factory, "bert-int8-keep-attention"))

    # Execute
    read = _backward_softmax_inputs(graph)

    # Assert
    assert [n.op_type for n in graph.node].count("Softmax") == BLOCKS
    assert len(read) == BLOCKS and not any(name.endswith("_recompute") for name in read)


def test_recomputing_changes_no_numbers(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: the same seed builds the same adapters; only the training graphs differ
    texts, labels = keyword_dataset(16, seed=5)

    def train(name: str) -> tuple[list[float], np.ndarray]:
        runtime = BundleRuntime(bundle(tmp_path_factory, name), threads=1)
        runtime.set_learning_rate(0.02)
        ids, mask = runtime.encode(texts)
        feats, targets = runtime.features(ids, mask), runtime.targets(ids, mask, labels)
        return [runtime.train_step(feats, mask, targets) for _ in range(4)], runtime.get_flat()

    # Execute
    (recomputed_losses, recomputed), (kept_losses, kept) = train("bert-int8"), train("bert-int8-keep-attention")

    # Assert
    assert recomputed_losses == kept_losses and recomputed_losses[-1] < recomputed_losses[0]
    np.testing.assert_array_equal(recomputed, kept)
