"""The bundle manifest: what a device needs to know about a bundle, and how it checks one.

Written by the build step (host), read by devices and the coordinator; numpy/stdlib only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# 2: graphs for stock ONNX Runtime, parameters in params.safetensors, AdamW settings in the
# manifest. 1 was ONNX Runtime Training's format (checkpoint + optimizer graph).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# File roles inside a bundle folder.
TRAINING_MODEL = "training_model.onnx"  # inputs: the roles of `inputs["training"]`, then every parameter
EVAL_MODEL = "eval_model.onnx"
PARAMS = "params.safetensors"  # every parameter, frozen (at its own dtype) and trainable (fp32)
LOWER_MODEL = "lower_model.onnx"  # present only when the frozen lower backbone is split off
TOKENIZER = "tokenizer.json"
GRAD_SUFFIX = "_grad"  # the training graph outputs "loss" and, per trainable parameter P, "P_grad"


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what is wrong."""


@dataclass
class TrainableParam:
    """One trainable tensor, at `offset` (in elements) in the bundle's flat trainable vector."""

    name: str
    shape: list[int]
    dtype: str
    offset: int

    @property
    def size(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class Manifest:
    """Everything about a bundle except the bytes; serialised as sorted JSON."""

    model_id: str
    model_type: str
    task: str  # "classify" | "causal-lm"
    labels: list[str]
    max_seq_len: int
    adapter: dict  # {"kind": "lora"|"head", "rank", "alpha", "targets", "train_layers"}
    quantization: dict  # {"scheme": "none"|"int8"|"int4", "block_size", "report": {...}}
    num_blocks: int
    first_trainable_block: int  # 0 = no split; else lower_model.onnx runs blocks [0, first)
    hidden_size: int
    trainable: list[TrainableParam]
    inputs: dict  # role -> graph input name, for the training/eval graph and the lower graph
    # AdamW settings the device optimizer runs with (device/optim.py AdamWConfig.to_dict()).
    optimizer: dict = field(default_factory=lambda: {"kind": "adamw"})
    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"bytes", "sha256"}
    built_with: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.trainable = [p if isinstance(p, TrainableParam) else TrainableParam(**p) for p in self.trainable]
        if self.task not in ("classify", "causal-lm"):
            raise BundleError(f"manifest task {self.task!r} is not one of classify, causal-lm")
        if self.task == "classify" and len(self.labels) < 2:
            raise BundleError(f"a classify bundle needs at least 2 labels, manifest has {self.labels!r}")

    @property
    def split(self) -> bool:
        return self.first_trainable_block > 0

    @property
    def trainable_count(self) -> int:
        return sum(p.size for p in self.trainable)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"manifest format_version {version!r} is not supported (this edgeftl reads {FORMAT_VERSION}); "
                "rebuild the bundle or update edgeftl"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"manifest has unknown keys {unknown}; accepted: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise BundleError(f"manifest is incomplete: {exc}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} for every file under folder except the manifest."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        table[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return table


def read_manifest(folder: Path) -> Manifest:
    """Parse folder/manifest.json without checking file hashes."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{str(folder)!r} is not a bundle: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{str(path)!r} must hold a JSON object")
    if data.get("format_version") == 1:
        raise BundleError(
            f"bundle {str(folder)!r} was built for ONNX Runtime Training (manifest format 1); edgeftl devices now "
            f"train on stock ONNX Runtime and read format {FORMAT_VERSION}: rebuild it with `edgeftl build`")
    return Manifest.from_dict(data)


def verify_bundle(folder: Path) -> Manifest:
    """Read the manifest and check every listed file exists with its recorded size and sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, entry in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"bundle file {rel!r} is missing from {str(folder)!r}; re-copy the bundle")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(f"bundle file {rel!r} fails its sha256 check (corrupt or changed); re-copy the bundle")
    return manifest
