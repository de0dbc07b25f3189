"""`edgeftl build`: pretrained model -> quantized frozen backbone + adapters -> a bundle stock ONNX Runtime trains.

Reads top to bottom like the pipeline: load, attach trainable parts, split off the frozen
lower stack, quantize, export, generate the training graphs (with ONNX Runtime Training, then
made portable), write the manifest, check the bundle trains as ONNX Runtime Training does, and
publish the folder by renaming it into place (a failed build leaves no partial bundle).
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgeftl.coordinator.bundler import artifacts
from edgeftl.coordinator.bundler.config import BuildConfig, BuildError
from edgeftl.coordinator.bundler.export import export_onnx
from edgeftl.coordinator.bundler.probe import check_bundle
from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.manifest import (
    CAUSAL_LM,
    CLASSIFY,
    LORA_KINDS,
    LOWER_MODEL,
    MANIFEST,
    TOKENIZER,
    Adapter,
    GraphInputs,
    Manifest,
    Quantization,
    file_table,
)
from edgeftl.models.adapters.lora import LoraConfig, attach_lora, lora_factors
from edgeftl.models.loading import Pretrained, default_model_dir, load_pretrained, read_config
from edgeftl.models.packaged import packaged_model, resolve_model
from edgeftl.models.task import LowerModel, UpperModel, make_head

STEPS = ("export frozen lower stack", "quantize", "export training graph",
         "generate training graphs", "write manifest", "check against ONNX Runtime Training")
DUMMY_BATCH, DUMMY_SEQ = 2, 16  # export shapes; both axes are dynamic in the graphs
PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Embedding tables this small stay fp32: they cost nothing, and a token-type row is added to
# every token, so its int4 error alone cost 0.012 logits cosine on MiniLM.
SMALL_TABLE_ROWS = 16


def build(config: BuildConfig, progress: bool = True) -> Manifest:
    """Build the bundle described by `config` into `config.out` and return its manifest.

    Raises:
        BuildError / ModelError: bad input, before any output folder exists.
    """
    model_dir = default_model_dir() if config.model is None else resolve_model(config.model, progress=progress)
    positions = read_config(model_dir).get("max_position_embeddings")  # fail fast on a bad folder or architecture
    asked = config.max_seq_len
    if isinstance(positions, int) and 8 <= positions < asked:
        # A bundle must never promise more tokens than the model has positions: devices (and the
        # memory plan `edgeftl flash` measures at max_seq_len) would fail on longer inputs.
        config = replace(config, max_seq_len=positions)
    # Loading and attaching validate the rest (targets, --train-layers) before any output or
    # progress bar exists, so bad input costs one error line.
    pre, model, first = prepare_model(model_dir, config)
    if config.max_seq_len < asked:  # said once the input is known to be good (bad input gets one line)
        print(f"note: --max-seq-len {asked} is more than the model's {config.max_seq_len} positions; "
              f"the bundle takes {config.max_seq_len}", file=sys.stderr)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=config.out.parent, prefix=f".{config.out.name}.building-"))
    reference_root = (config.reference_dir or config.out).parent
    reference_root.mkdir(parents=True, exist_ok=True)
    reference = Path(tempfile.mkdtemp(dir=reference_root, prefix=f".{config.out.name}.reference-"))
    try:
        with tqdm(total=len(STEPS), desc="edgeftl build", unit="step", disable=not progress) as bar:
            manifest = _build_into(staging, reference, model_dir, config, (pre, model, first), bar)
        _publish(staging, config.out, config.force)
        if config.reference_dir is not None:
            _publish(reference, config.reference_dir, force=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(reference, ignore_errors=True)
    return manifest


def _build_into(staging: Path, reference: Path, model_dir: Path, config: BuildConfig,
                prepared: tuple[Pretrained, UpperModel, int], bar: tqdm) -> Manifest:
    def step(name: str) -> None:
        bar.set_postfix_str(name)

    pre, model, first = prepared
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]

    step(STEPS[0])
    if first > 0:
        _export_lower(pre, first, config, staging)
    bar.update()

    step(STEPS[1])
    report = _quantize_upper(model, pre, first, config)
    bar.update()

    step(STEPS[2])
    graph = export_onnx(model, *_upper_signature(pre, config, first), staging / "upper_model.onnx")
    bar.update()

    step(STEPS[3])
    # Quantized weights: dequantize again for the backward pass rather than hold fp32 copies.
    generated = artifacts.generate(graph, trainable, staging, reference, recompute=config.quant != "none",
                                   recompute_attention=config.recompute_attention)
    (staging / "upper_model.onnx").unlink()
    bar.update()

    step(STEPS[4])
    pad_id = _copy_tokenizer(model_dir, staging)
    roles = lora_factors(model)
    manifest = Manifest(
        model_id=config.model_id or _model_id(config.model, model_dir),
        model_type=pre.model_type,
        task=config.task,
        labels=list(config.labels),
        max_seq_len=config.max_seq_len,
        adapter=_adapter(config, pre, first),
        quantization=Quantization(config.quant, config.block_size,
                                  config.int8_top_blocks if config.quant == "int4" else 0, report),
        num_blocks=pre.num_blocks,
        first_trainable_block=first,
        hidden_size=pre.hidden_size,
        trainable=[replace(p, lora=roles.get(p.name)) for p in generated.trainable],
        optimizer=generated.optimizer,
        inputs=GraphInputs(
            training=["hidden_states" if first else "input_ids", "attention_mask", "labels", "loss_weight"],
            lower=["input_ids", "attention_mask"] if first else [],
            pad_token_id=pad_id,
        ),
        files=file_table(staging),
        built_with=_versions(),
    )
    atomic_write(staging / MANIFEST, manifest.to_json())
    bar.update()

    step(STEPS[5])
    check_bundle(staging, reference)
    bar.update()
    return manifest


def _model_id(model: Path | None, model_dir: Path) -> str:
    """The name a manifest records: the packaged model's hub id, else the folder's name."""
    if model is None:
        return PACKAGED_MODEL_ID
    packaged = packaged_model(model)
    return packaged.model_id if packaged is not None else model_dir.name


def _adapter(config: BuildConfig, pre: Pretrained, first: int) -> Adapter:
    """The manifest's adapter section: LoRA's shape (zeros for a head-only bundle) and the trained depth."""
    lora = config.adapter in LORA_KINDS
    return Adapter(kind=config.adapter, rank=config.rank if lora else 0, alpha=config.alpha if lora else 0,
                   targets=list(config.targets or pre.family.attention_targets) if lora else [],
                   train_layers=pre.num_blocks - first)


def prepare_model(model_dir: Path, config: BuildConfig) -> tuple[Pretrained, UpperModel, int]:
    """The fp32 PyTorch task model the bundle is built from (also the fidelity reference).

    Returns the loaded backbone, the task model with its trainable parts attached, and the
    index of the first trainable block.
    """
    torch.manual_seed(config.seed)
    pre = load_pretrained(model_dir, causal_lm=config.task == CAUSAL_LM)
    first = _first_trainable_block(pre, config.train_layers)
    return pre, _attach_trainable(pre, config, first), first


def _first_trainable_block(pre: Pretrained, train_layers: int | None) -> int:
    if train_layers is None:
        return 0
    if train_layers > pre.num_blocks:
        raise BuildError(
            f"--train-layers {train_layers} is larger than the model's {pre.num_blocks} blocks; "
            f"accepted: 1..{pre.num_blocks}"
        )
    return pre.num_blocks - train_layers


def _attach_trainable(pre: Pretrained, config: BuildConfig, first: int) -> UpperModel:
    for param in pre.backbone.parameters():
        param.requires_grad_(False)
    if config.adapter in LORA_KINDS:
        targets = config.targets or pre.family.attention_targets
        try:
            attach_lora(pre.backbone.blocks(), first, LoraConfig(config.rank, config.alpha, targets,
                                                                 variant=config.adapter))
        except ValueError as exc:
            raise BuildError(str(exc)) from exc
    head = make_head(config.task, pre.hidden_size, len(config.labels), pre.lm_head)
    if config.task == CAUSAL_LM:
        head.requires_grad_(False)  # the LM head is backbone: frozen (and quantized)
    return UpperModel(pre.backbone, head, config.task, first)


def _export_lower(pre: Pretrained, first: int, config: BuildConfig, staging: Path) -> None:
    from edgeftl.quantization.ort_int import quantize_onnx_inference
    from edgeftl.quantization.schemes import QuantScheme

    lower = LowerModel(pre.backbone, first)
    ids = torch.ones(DUMMY_BATCH, DUMMY_SEQ, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "hidden_states": {0: "batch", 1: "seq"}}
    fp32 = staging / "lower_fp32.onnx"
    export_onnx(lower, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["hidden_states"], axes, fp32)
    quantize_onnx_inference(fp32, staging / LOWER_MODEL, QuantScheme(config.quant, config.block_size))
    fp32.unlink(missing_ok=True)


def _quantize_upper(model: UpperModel, pre: Pretrained, first: int, config: BuildConfig) -> dict:
    """Quantize the frozen modules the training graph uses; trainable modules stay fp32."""
    from edgeftl.quantization.modules import quantize_module_
    from edgeftl.quantization.report import model_report
    from edgeftl.quantization.schemes import QuantScheme

    unused = {id(m) for index in range(first) for m in pre.backbone.blocks()[index].modules()}

    def skip(name: str, module: nn.Module) -> bool:
        if id(module) in unused or any(p.requires_grad for p in module.parameters()):
            return True
        if isinstance(module, nn.Embedding) and module.num_embeddings <= SMALL_TABLE_ROWS:
            return True  # e.g. BERT's 2-row token-type table: a bias added to every token
        return first > 0 and isinstance(module, nn.Embedding)  # embeddings live in the lower graph

    rows: list[dict] = []
    scheme = QuantScheme(config.quant, config.block_size)
    if config.quant == "int4" and config.int8_top_blocks:
        # Mixed precision, as int4 recipes usually are (llama.cpp's Q4_K_M keeps some tensors at
        # 6 bits): the top blocks feed the head with nothing after them to average their
        # error out; on MiniLM, int4 in the top block alone cost ~0.04 logits cosine.
        int8 = QuantScheme("int8", config.block_size)
        blocks = pre.backbone.blocks()
        if config.task == CAUSAL_LM:
            # The LM head (SmolLM2's is tied to the 49,152 x 576 embedding; in the model, the
            # ChunkedLMHead's row blocks) and the input embedding too: in an int4 SmolLM2 top-2
            # bundle the int4 head and top blocks cost +0.10 nats per token of its +0.32
            # (bench_build_llm).
            quantize_module_(model, int8, lambda name, m: skip(name, m) or not (
                _inside(m, model.head) or isinstance(m, nn.Embedding)), report_rows=rows)
        for index in range(max(first, len(blocks) - config.int8_top_blocks), len(blocks)):
            quantize_module_(model, int8, lambda name, m, b=blocks[index]: skip(name, m) or not _inside(m, b),
                             report_rows=rows)
    quantize_module_(model, scheme, skip, report_rows=rows)  # already-quantized modules are skipped
    return model_report(rows)


def _inside(module: nn.Module, root: nn.Module) -> bool:
    return any(module is m for m in root.modules())


def _upper_signature(pre: Pretrained, config: BuildConfig, first: int):
    batch, seq = DUMMY_BATCH, DUMMY_SEQ
    ids = torch.ones(batch, seq, dtype=torch.int64)
    main = torch.zeros(batch, seq, pre.hidden_size) if first else ids
    labels = torch.zeros(batch, dtype=torch.int64) if config.task == CLASSIFY else ids.clone()
    inputs = {"hidden_states" if first else "input_ids": main, "attention_mask": torch.ones_like(ids),
              "labels": labels, "loss_weight": torch.tensor(1.0)}
    axes = {name: {0: "batch", 1: "seq"} for name in inputs if name != "loss_weight"}
    axes["labels"] = {0: "batch"} if config.task == CLASSIFY else {0: "batch", 1: "seq"}
    axes["logits"] = {0: "batch"} if config.task == CLASSIFY else {0: "batch", 1: "seq"}
    return inputs, ["loss", "logits"], axes


def _copy_tokenizer(model_dir: Path, staging: Path) -> int:
    import json

    shutil.copyfile(model_dir / TOKENIZER, staging / TOKENIZER)
    data = json.loads((model_dir / TOKENIZER).read_text(encoding="utf-8"))
    config_path = model_dir / "config.json"
    pad = json.loads(config_path.read_text(encoding="utf-8")).get("pad_token_id")
    if pad is None:
        pad = (data.get("padding") or {}).get("pad_id", 0)
    return int(pad)


def _versions() -> dict[str, str]:
    from edgeftl.coordinator.bundler import training_build

    names = ("edgeftl", "torch", "transformers", "onnx", "onnxruntime", "numpy")
    found = {"python": platform.python_version(), training_build.PACKAGE: training_build.VERSION}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished staging folder into place; an old folder is replaced only with --force."""
    if out.exists():
        if not force:
            raise BuildError(f"output folder {str(out)!r} already exists; pass --force to replace it")
        trash = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(trash, ignore_errors=True)
        out.rename(trash)
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)
