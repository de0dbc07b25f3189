"""`edgeftl inspect`: what a bundle holds, file by file."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from edgeftl.device.cli.common import fail
from edgeftl.device.protocol.manifest import LORA_KINDS, BundleError, Manifest, read_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the manifest plus totals as JSON")


def summary(folder: Path, manifest: Manifest) -> dict:
    files = {rel: (folder / rel).stat().st_size if (folder / rel).is_file() else None for rel in manifest.files}
    return {
        "files_on_disk_bytes": files,
        "total_bytes": sum(size or 0 for size in files.values()),
        "trainable_params": manifest.trainable_count,
        "trainable_bytes": manifest.trainable_count * 4,
    }


def run(args: argparse.Namespace) -> int:
    try:
        manifest = read_manifest(args.bundle)
    except BundleError as exc:
        return fail(str(exc))
    totals = summary(args.bundle, manifest)
    if args.json:
        print(json.dumps({"manifest": asdict(manifest), **totals}, indent=2, sort_keys=True))
        return 0
    adapter = manifest.adapter
    print(f"bundle      {args.bundle}  (format {manifest.format_version})")
    print(f"model       {manifest.model_id} ({manifest.model_type}, {manifest.num_blocks} blocks, "
          f"hidden {manifest.hidden_size})")
    print(f"task        {manifest.task}" + (f"  labels: {', '.join(manifest.labels)}" if manifest.labels else ""))
    print(f"adapter     {adapter.kind}" + (f" r={adapter.rank} alpha={adapter.alpha} on "
          f"{','.join(adapter.targets)}" if adapter.kind in LORA_KINDS else "")
          + f", top {adapter.train_layers} of {manifest.num_blocks} blocks trainable")
    quant = manifest.quantization
    print(f"backbone    {quant.scheme}" + (f" (block {quant.block_size})" if quant.scheme == "int4" else "")
          + (f", frozen lower blocks 0..{manifest.first_trainable_block - 1} in lower_model.onnx"
             if manifest.split else ""))
    print(f"max seq len {manifest.max_seq_len}")
    print(f"trainable   {totals['trainable_params']:,} params, {totals['trainable_bytes'] / 2**10:.1f} KiB fp32, "
          f"{len(manifest.trainable)} tensors")
    opt = manifest.optimizer
    print(f"optimizer   {opt.kind} mode {opt.mode}, betas {opt.beta1}/{opt.beta2}, eps {opt.eps}, "
          f"weight decay {opt.weight_decay} "
          "(numpy, on the device)")
    built = manifest.built_with
    print(f"built with  onnxruntime {built.get('onnxruntime', '?')}, gradients by "
          f"onnxruntime-training-cpu {built.get('onnxruntime-training-cpu', '?')}; runs on stock onnxruntime")
    print("files:")
    for rel, size in totals["files_on_disk_bytes"].items():
        shown = "MISSING" if size is None else f"{size / 2**20:9.2f} MiB"
        print(f"  {rel:28s} {shown}")
    print(f"  {'total':28s} {totals['total_bytes'] / 2**20:9.2f} MiB")
    return 0
