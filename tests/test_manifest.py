"""The typed manifest: what it refuses (naming the field), what it keeps byte for byte, LoRA pairs."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from edgeftl.device.protocol.manifest import (
    MANIFEST,
    AdamWConfig,
    BundleError,
    LoraFactor,
    Manifest,
    TrainableParam,
    bundle_sha256,
    lora_pairs,
    read_manifest,
)


def _lora(layer: str, factor: str) -> dict:
    return {"layer": layer, "factor": factor}


def _data() -> dict:
    """A small manifest as it is stored: one LoRA layer of rank 2 (in 3, out 4) and a head bias."""
    return {
        "model_id": "tiny", "model_type": "bert", "task": "classify", "labels": ["neg", "pos"],
        "max_seq_len": 16, "num_blocks": 2, "first_trainable_block": 0, "hidden_size": 4,
        "adapter": {"kind": "lora", "rank": 2, "alpha": 16.0, "targets": ["query"], "train_layers": 2},
        "quantization": {"scheme": "int8", "block_size": 32, "int8_top_blocks": 0, "report": {"tensors": 0}},
        "trainable": [
            {"name": "q.lora_A", "shape": [2, 3], "dtype": "float32", "offset": 0, "lora": _lora("q", "A")},
            {"name": "q.lora_B", "shape": [4, 2], "dtype": "float32", "offset": 6, "lora": _lora("q", "B")},
            {"name": "head.bias", "shape": [2], "dtype": "float32", "offset": 14, "lora": None},
        ],
        "inputs": {"training": ["input_ids", "attention_mask", "labels", "loss_weight"], "lower": [],
                   "pad_token_id": 0},
        "optimizer": {"kind": "adamw", "beta1": 0.9, "beta2": 0.999, "eps": 1e-06, "weight_decay": 0.0,
                      "bias_correction": True, "mode": 1},
        "files": {"tokenizer.json": {"bytes": 3, "sha256": "0" * 64}},
        "built_with": {"python": "3.11.7"},
        "format_version": 2,
    }


def _changed(path: tuple, value: object) -> dict:
    data = copy.deepcopy(_data())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def test_sections_are_typed_and_json_round_trips_unchanged():
    # Execute
    manifest = Manifest.from_dict(_data())
    text = manifest.to_json()
    # Assert: typed sections, and the JSON is the stored object again (sorted, same values)
    assert manifest.adapter.rank == 2 and manifest.inputs.pad_token_id == 0
    assert manifest.files["tokenizer.json"].bytes == 3
    assert manifest.optimizer == AdamWConfig(eps=1e-6)
    assert manifest.trainable[0].lora == LoraFactor("q", "A")
    assert json.loads(text) == _data()
    assert text == json.dumps(_data(), indent=2, sort_keys=True) + "\n"


def test_an_integer_stays_an_integer_where_a_number_is_accepted():
    # A head bundle stores alpha 0; rewritten as 0.0 its manifest (and bundle hash) would change.
    data = _changed(("adapter",), {"kind": "head", "rank": 0, "alpha": 0, "targets": [], "train_layers": 2})
    data["trainable"] = [data["trainable"][2] | {"offset": 0}]
    assert '"alpha": 0,' in Manifest.from_dict(data).to_json()


@pytest.mark.parametrize(("path", "value", "message"), [
    (("adapter", "dropout"), 0.1, r"manifest.adapter has unknown keys \['dropout'\]"),
    (("trainable", 0, "shape", 1), "3", r"manifest.trainable\[0\].shape\[1\] must be an integer, got '3'"),
    (("inputs", "pad_token_id"), True, r"manifest.inputs.pad_token_id must be an integer, got True"),
    (("quantization", "scheme"), "int2", r"scheme 'int2' is not one of none, int8, int4"),
    (("files", "tokenizer.json", "bytes"), 3.0, r"manifest.files\['tokenizer.json'\].bytes must be an integer"),
    (("optimizer", "momentum"), 0.9, r"manifest.optimizer has unknown keys \['momentum'\]"),
    (("trainable", 1, "lora", "factor"), "C", r"factor 'C' is not one of A, B"),
    (("task",), "translate", r"task 'translate' is not one of classify, causal-lm"),
    (("labels",), "neg,pos", r"manifest.labels must be a list"),
])
def test_wrong_keys_and_types_are_refused_naming_the_field(path: tuple, value: object, message: str):
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(_changed(path, value))


def test_a_missing_key_is_named():
    data = _data()
    del data["inputs"]["lower"]
    with pytest.raises(BundleError, match=r"manifest.inputs lacks keys \['lower'\]"):
        Manifest.from_dict(data)


def test_lora_pairs_come_from_the_roles_not_the_names():
    # Prepare: names that say nothing; the roles pair them
    trainable = [TrainableParam("x", [2, 3], "float32", 0, LoraFactor("l", "A")),
                 TrainableParam("head", [2], "float32", 6),
                 TrainableParam("y", [4, 2], "float32", 8, LoraFactor("l", "B"))]
    # Execute / Assert
    assert [(a.name, b.name) for a, b in lora_pairs(trainable)] == [("x", "y")]
    assert lora_pairs(trainable[1:2]) == []


@pytest.mark.parametrize(("index", "change", "message"), [
    (1, {"lora": None}, r"layer 'q' has factors \['A'\]; it needs \['A', 'B'\]"),
    (1, {"lora": _lora("q", "A")}, r"layer 'q' has two A factors"),
    (1, {"shape": [4, 3]}, r"A \[2, 3\] and B \[4, 3\] are not \(r, in\) and \(out, r\)"),
])
def test_incomplete_or_misshapen_lora_pairs_are_refused(index: int, change: dict, message: str):
    data = _data()
    data["trainable"][index].update(change)
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(data)


def test_a_manifest_from_before_lora_roles_still_loads():
    # Format 2 bundles built before the build recorded LoRA factors have no "lora" keys.
    data = _data()
    for entry in data["trainable"]:
        del entry["lora"]
    manifest = Manifest.from_dict(data)
    assert lora_pairs(manifest.trainable) == []


def test_bundle_sha256_is_the_hash_of_the_manifest_bytes(tmp_path: Path):
    text = Manifest.from_dict(_data()).to_json()
    (tmp_path / MANIFEST).write_text(text)
    assert bundle_sha256(tmp_path) == hashlib.sha256(text.encode()).hexdigest()
    assert read_manifest(tmp_path) == Manifest.from_dict(_data())


def test_trainable_entries_must_be_float32_and_back_to_back():
    # The flat vector's layout (docs/PROTOCOL.md 6.6): offsets in elements, contiguous, in order.
    gap = _data()
    gap["trainable"][-1]["offset"] += 1
    with pytest.raises(BundleError, match=r"expected .*: entries must be contiguous and in order"):
        Manifest.from_dict(gap)
    half = _data()
    half["trainable"][0]["dtype"] = "float16"
    with pytest.raises(BundleError, match="must be float32"):
        Manifest.from_dict(half)
