"""LoRA variants that train fewer values per layer (issue 16: fewer bytes per update).

lora-fa freezes A and trains B; lora-xs freezes A and B at the layer's top-r singular vectors and
trains an r x r core. Both bundles must train on stock ONNX Runtime like plain LoRA, start from
the pretrained function, and aggregate exactly under FedAvg (the update is linear in what trains).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.params import read_params
from edgeftl.device.protocol.manifest import Adapter, verify_bundle
from edgeftl.models.adapters.lora import LoraConfig, LoraLinear

from fixtures_build import bundle, keyword_dataset

HIDDEN, RANK, BLOCKS, LABELS = 32, 8, 2, 2  # tests/tiny_models.py's BERT
TARGETS = ("attention.self.query", "attention.self.value")
HEAD_VALUES = LABELS * HIDDEN + LABELS
LAYERS = BLOCKS * len(TARGETS)


def _trainable(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    folder = bundle(tmp_path_factory, name)
    return {p.name: tuple(p.shape) for p in verify_bundle(folder).trainable}


@pytest.mark.parametrize("name, kind, factor, shape", [
    ("bert-lora-fa", "lora-fa", "lora_B", (HIDDEN, RANK)),
    ("bert-lora-xs", "lora-xs", "lora_R", (RANK, RANK)),
])
def test_variant_bundles_train_only_their_factor_and_the_head(
    name: str, kind: str, factor: str, shape: tuple[int, int], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Execute
    trainable = _trainable(name, tmp_path_factory)
    manifest = verify_bundle(bundle(tmp_path_factory, name))
    stored = read_params(bundle(tmp_path_factory, name) / "params.safetensors")

    # Assert: LAYERS factors of `shape` and the head train; the frozen factors are stored, not trained
    lora = {n: s for n, s in trainable.items() if "lora_" in n}
    assert len(lora) == LAYERS and all(n.endswith(factor) and s == shape for n, s in lora.items()), lora
    assert manifest.trainable_count == LAYERS * shape[0] * shape[1] + HEAD_VALUES
    assert manifest.adapter == Adapter(kind=kind, rank=RANK, alpha=16.0, targets=["query", "value"],
                                       train_layers=BLOCKS)
    frozen = [n for n in stored if "lora_" in n and not n.endswith(factor)]
    assert len(frozen) == LAYERS * (1 if kind == "lora-fa" else 2) and not set(frozen) & set(trainable)
    assert all(p.lora is None for p in manifest.trainable)  # lora-svd's factor pairs: none, FedAvg is exact


def test_lora_xs_starts_at_the_pretrained_layer_and_spans_its_top_singular_directions() -> None:
    # Prepare
    torch.manual_seed(0)
    base = nn.Linear(24, 16).requires_grad_(False)  # the build freezes the backbone first
    layer = LoraLinear(base, 24, 16, LoraConfig(rank=4, alpha=8.0, targets=("x",), variant="lora-xs"))
    x = torch.randn(5, 24)

    # Execute
    before = layer(x)
    u, s, vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)

    # Assert: R = 0 adds nothing; A has orthonormal rows; B A is W's best rank-4 approximation
    assert torch.equal(before, base(x))
    assert torch.allclose(layer.lora_A @ layer.lora_A.t(), torch.eye(4), atol=1e-5)
    assert torch.allclose(layer.lora_B @ layer.lora_A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_R"]


@pytest.mark.parametrize("variant, factor", [("lora-fa", "lora_B"), ("lora-xs", "lora_R")])
def test_the_mean_of_the_trained_factor_is_the_mean_of_the_layer_updates(variant: str, factor: str) -> None:
    # Prepare: two devices' copies of one layer, each with its own trained values
    torch.manual_seed(1)
    base = nn.Linear(12, 10)
    config = LoraConfig(rank=3, alpha=6.0, targets=("x",), variant=variant)
    layers = [LoraLinear(base, 12, 10, config) for _ in range(3)]
    layers[1].lora_A.data, layers[2].lora_A.data = layers[0].lora_A.data, layers[0].lora_A.data  # one bundle
    for layer in layers[:2]:
        getattr(layer, factor).data = torch.randn_like(getattr(layer, factor))
    getattr(layers[2], factor).data = (getattr(layers[0], factor) + getattr(layers[1], factor)) / 2
    x = torch.randn(7, 12)

    # Execute
    updates = [layer(x) - base(x) for layer in layers]

    # Assert: FedAvg of the factor gives exactly the mean of the two layers' updates
    assert torch.allclose(updates[2], (updates[0] + updates[1]) / 2, atol=1e-5)


@pytest.mark.parametrize("name", ["bert-lora-fa", "bert-lora-xs"])
def test_variant_bundles_learn_on_stock_onnx_runtime(
    name: str, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    root = tmp_path_factory.mktemp(name)
    train = write_csv(root / "train.csv", *keyword_dataset(96, seed=1))
    held_out = write_csv(root / "eval.csv", *keyword_dataset(64, seed=2))
    capsys.readouterr()

    # Execute
    rc = main(["device", "train", "--bundle", str(bundle(tmp_path_factory, name)), "--data", str(train),
               "--eval", str(held_out), "--steps", "60", "--batch", "16", "--lr", "0.02", "--seed", "0",
               "--threads", "1", "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])

    # Assert: held-out loss below the start and the keyword rule mostly learnt (lora-xs: 0.84, fa: 0.8+)
    assert rc == 0
    assert summary["eval_loss"] < 0.85 * summary["first_loss"], summary
    assert summary["eval_accuracy"] >= 0.75, summary
