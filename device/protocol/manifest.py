"""The bundle manifest: what a device needs to know about a bundle, and how it checks one.

Written by the build step (host), read by devices and the coordinator; standard library only.
Every section is a small typed dataclass, checked field by field when it is made or read
(`typed.py`), and serialised with `asdict` as sorted JSON. docs/BUNDLE.md §2 documents the fields.
This module is also the home of the names a bundle carries: its tasks, adapters and
quantization schemes, which the build, the models and the devices import from here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.typed import conform, from_json

# 2: graphs for stock ONNX Runtime, parameters in params.safetensors, AdamW settings in the
# manifest. 1 was ONNX Runtime Training's format (checkpoint + optimizer graph).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# File roles inside a bundle folder.
TRAINING_MODEL = "training_model.onnx"  # inputs: the roles of `inputs.training`, then every parameter
EVAL_MODEL = "eval_model.onnx"
PARAMS = "params.safetensors"  # every parameter, frozen (at its own dtype) and trainable (fp32)
LOWER_MODEL = "lower_model.onnx"  # present only when the frozen lower backbone is split off
TOKENIZER = "tokenizer.json"
GRAD_SUFFIX = "_grad"  # the training graph outputs "loss" and, per trainable parameter P, "P_grad"

# What a bundle is trained for: a label per text (mean-pooled head), or the next token.
CLASSIFY, CAUSAL_LM = "classify", "causal-lm"
TASKS = (CLASSIFY, CAUSAL_LM)
# What is trained: LoRA factors (plus a classify head), or the head alone.
LORA, HEAD = "lora", "head"
# LoRA variants that train fewer parameters per adapted layer (models/adapters/lora.py):
# lora-fa freezes A and trains B (half of LoRA's factors; exact under FedAvg: every device shares
# the bundle's A); lora-xs freezes A and B at the layer's top-r singular vectors and trains an r x r
# core R between them (r*r values per layer). Devices train whatever the bundle marks trainable.
LORA_FA, LORA_XS = "lora-fa", "lora-xs"
LORA_KINDS = (LORA, LORA_FA, LORA_XS)
ADAPTERS = (LORA, HEAD, LORA_FA, LORA_XS)
LORA_FACTORS = ("A", "B")  # a LoRA layer's two trainable factors (`LoraFactor`)
# How the frozen backbone's weights are stored: fp32, int8 per row, int4 per block of a row.
QUANT_SCHEMES = ("none", "int8", "int4")
# A pinned coordinator key: "ed25519:" + base64 of its 32 raw bytes (protocol/auth.py reads it).
COORDINATOR_KEY = re.compile(r"ed25519:[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what is wrong."""


def _one_of(value: str, accepted: tuple[str, ...], where: str) -> None:
    if value not in accepted:
        raise BundleError(f"{where} {value!r} is not one of {', '.join(accepted)}")


@dataclass
class LoraFactor:
    """Which LoRA factor a trainable tensor is: the layer adds (alpha / rank) * B @ A to its output.

    The build records it (`models/adapters/lora.py` `lora_factors`), so that nothing downstream
    has to recognise LoRA tensors by their names.
    """

    layer: str  # the adapted linear layer; its A and B name the same layer
    factor: str  # "A": (rank, in_features); "B": (out_features, rank)

    def __post_init__(self) -> None:
        conform(self, "manifest.trainable[].lora", BundleError)
        _one_of(self.factor, LORA_FACTORS, "manifest.trainable[].lora.factor")


@dataclass
class TrainableParam:
    """One trainable tensor, at `offset` (in elements) in the bundle's flat trainable vector."""

    name: str
    shape: list[int]
    dtype: str
    offset: int
    # None: not a LoRA factor (a head), or a bundle built before the build recorded factors.
    lora: LoraFactor | None = None

    def __post_init__(self) -> None:
        conform(self, "manifest.trainable entry", BundleError)
        if self.dtype != "float32" or self.offset < 0 or any(d < 0 for d in self.shape):
            raise BundleError(f"manifest.trainable entry {self.name!r} must be float32 with a non-negative offset "
                              f"and shape, got {self.dtype} at {self.offset} {self.shape}")

    @property
    def size(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class Adapter:
    """What is trained, and where: `train_layers` top blocks; LoRA's rank, alpha and targets."""

    kind: str  # one of ADAPTERS
    rank: int  # 0 for head
    alpha: float  # 0 for head; a LoRA layer adds (alpha / rank) * B @ A (lora-xs: B @ R @ A)
    targets: list[str]  # module-name suffixes of the adapted linears; [] for head
    train_layers: int

    def __post_init__(self) -> None:
        conform(self, "manifest.adapter", BundleError)
        _one_of(self.kind, ADAPTERS, "manifest.adapter.kind")


@dataclass
class Quantization:
    """How the frozen backbone is stored, and what that cost (`quantization/report.py`)."""

    scheme: str  # one of QUANT_SCHEMES
    block_size: int  # values per int4 scale along a row
    int8_top_blocks: int  # int4 only: the top blocks whose linears stay int8
    report: dict  # model_report(): bytes and errors per tensor and in total

    def __post_init__(self) -> None:
        conform(self, "manifest.quantization", BundleError)
        _one_of(self.scheme, QUANT_SCHEMES, "manifest.quantization.scheme")


@dataclass
class GraphInputs:
    """The graphs' data input names, in feeding order, and the token that pads."""

    training: list[str]  # features, attention mask, labels, loss weight (training and eval graphs)
    lower: list[str]  # the lower graph's inputs; [] when there is no lower graph
    pad_token_id: int

    def __post_init__(self) -> None:
        conform(self, "manifest.inputs", BundleError)


@dataclass
class FileEntry:
    """A bundle file's size and digest, checked before the file is used."""

    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        conform(self, "manifest.files entry", BundleError)


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW settings the device optimizer runs with (`device/optim.py`), as the manifest stores them."""

    kind: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    bias_correction: bool = True
    mode: int = 1  # 1: Hugging Face (bias correction folded into lr, decay after); 0: PyTorch

    def __post_init__(self) -> None:
        conform(self, "manifest.optimizer", BundleError)
        _one_of(self.kind, ("adamw",), "manifest.optimizer.kind")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise BundleError(f"AdamW betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0 or self.weight_decay < 0:
            raise BundleError(f"AdamW needs eps > 0 and weight_decay >= 0, got {self.eps}, {self.weight_decay}")
        if self.mode not in (0, 1) or (self.mode == 0 and not self.bias_correction):
            raise BundleError(f"AdamW mode {self.mode} with bias_correction={self.bias_correction} is not "
                              "supported; accepted: mode 1, or mode 0 with bias correction")

    @classmethod
    def from_dict(cls, data: dict) -> AdamWConfig:
        """Settings from the manifest's `optimizer` object; keys left out take the defaults above."""
        return from_json(cls, data, "manifest.optimizer", BundleError)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Manifest:
    """Everything about a bundle except the bytes; serialised as sorted JSON."""

    model_id: str
    model_type: str
    task: str  # one of TASKS
    labels: list[str]
    max_seq_len: int
    adapter: Adapter
    quantization: Quantization
    num_blocks: int
    first_trainable_block: int  # 0 = no split; else lower_model.onnx runs blocks [0, first)
    hidden_size: int
    trainable: list[TrainableParam]
    inputs: GraphInputs
    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    files: dict[str, FileEntry] = field(default_factory=dict)  # relative path -> size and sha256
    built_with: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # The coordinator's public signing key: devices then refuse tasks and globals it did not sign.
    coordinator_key: str | None = None

    def __post_init__(self) -> None:
        conform(self, "manifest", BundleError)
        if self.coordinator_key is not None and not COORDINATOR_KEY.fullmatch(self.coordinator_key):
            raise BundleError(f"manifest coordinator_key {self.coordinator_key[:60]!r} is not "
                              "'ed25519:' + base64 of 32 bytes")
        _one_of(self.task, TASKS, "manifest task")
        if self.task == CLASSIFY and len(self.labels) < 2:
            raise BundleError(f"a classify bundle needs at least 2 labels, manifest has {self.labels!r}")
        for a, _ in lora_pairs(self.trainable):  # checks every pair is complete and fits
            if a.shape[0] != self.adapter.rank:
                raise BundleError(f"LoRA factor {a.name!r} has rank {a.shape[0]}, the adapter's is {self.adapter.rank}")
        end = 0
        for param in self.trainable:  # the flat vector: entries back to back, in order (PROTOCOL.md 6.6)
            if param.offset != end:
                raise BundleError(f"manifest.trainable entry {param.name!r} is at offset {param.offset}, "
                                  f"expected {end}: entries must be contiguous and in order")
            end += param.size

    @property
    def split(self) -> bool:
        return self.first_trainable_block > 0

    @property
    def trainable_count(self) -> int:
        return sum(p.size for p in self.trainable)

    def to_json(self) -> str:
        data = asdict(self)
        if data["coordinator_key"] is None:  # unpinned bundles keep the bytes (and the hash) they had
            del data["coordinator_key"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"manifest format_version {version!r} is not supported (this edgeftl reads {FORMAT_VERSION}); "
                "rebuild the bundle or update edgeftl"
            )
        return from_json(cls, data, "manifest", BundleError)


def lora_pairs(trainable: list[TrainableParam]) -> list[tuple[TrainableParam, TrainableParam]]:
    """(A, B) of every LoRA layer among `trainable`, in the order of the A factors.

    Raises:
        BundleError: a layer lacks a factor or has one twice, or A (r, in) and B (out, r)
            do not share a rank.
    """
    layers: dict[str, dict[str, TrainableParam]] = {}
    for param in trainable:
        if param.lora is not None:
            factors = layers.setdefault(param.lora.layer, {})
            if param.lora.factor in factors:
                raise BundleError(f"LoRA layer {param.lora.layer!r} has two {param.lora.factor} factors")
            factors[param.lora.factor] = param
    for layer, factors in layers.items():
        if set(factors) != set(LORA_FACTORS):
            raise BundleError(f"LoRA layer {layer!r} has factors {sorted(factors)}; it needs {list(LORA_FACTORS)}")
        a, b = factors["A"], factors["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise BundleError(f"LoRA layer {layer!r}: A {a.shape} and B {b.shape} are not (r, in) and (out, r)")
    return [(p, layers[p.lora.layer]["B"]) for p in trainable if p.lora is not None and p.lora.factor == "A"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_sha256(folder: Path) -> str:
    """A bundle's identity: the sha256 of its manifest.json bytes (which list every file's sha256).

    Devices and the coordinator put it in every message, so both must compute it the same way.
    """
    return sha256_file(Path(folder) / MANIFEST)


def file_table(folder: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under folder except the manifest, by relative path."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        table[path.relative_to(folder).as_posix()] = FileEntry(path.stat().st_size, sha256_file(path))
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


def pin_coordinator_key(folder: Path, key: str | None) -> str:
    """Write `key` (None: unpin) into a bundle's manifest; returns the bundle's new sha256. The
    pin changes the bundle's identity, so devices and the coordinator must use the pinned copy."""
    manifest = replace(verify_bundle(folder), coordinator_key=key)
    atomic_write(Path(folder) / MANIFEST, manifest.to_json(), mode=0o644)
    return bundle_sha256(folder)


def verify_bundle(folder: Path) -> Manifest:
    """Read the manifest and check every listed file exists with its recorded size and sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, entry in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"bundle file {rel!r} is missing from {str(folder)!r}; re-copy the bundle")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise BundleError(f"bundle file {rel!r} fails its sha256 check (corrupt or changed); re-copy the bundle")
    return manifest
