"""`edgeftl build`: pretrained model -> quantized training bundle for stock ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeftl.device.cli.common import csv_list, fail
from edgeftl.device.protocol.manifest import CLASSIFY, HEAD, LORA, LORA_FA, LORA_XS, QUANT_SCHEMES, TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="local Hugging Face model folder, or a packaged model by name: smollm2 (SmolLM2-135M-Instruct, "
                        "converted once into ~/.cache/edgeftl/models; $EDGEFTL_MODELS overrides) "
                        "(default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--task", default=CLASSIFY, help=f"{' | '.join(TASKS)} (default: {CLASSIFY})")
    p.add_argument("--labels", type=csv_list, default=None,
                   help="comma-separated label names (classify); default: the 5 BBC News topics "
                        "when neither --labels nor --num-labels is given")
    p.add_argument("--num-labels", type=int, default=None, help="number of labels, named label_0.. (classify)")
    p.add_argument("--adapter", default=LORA,
                   help=f"{LORA} (LoRA + head) | {LORA_FA} (LoRA with A frozen: B + head train, half of LoRA's "
                        f"values per update) | {LORA_XS} (A, B frozen at the top-r singular vectors, an r x r core + "
                        f"head train: r*r values per layer) | {HEAD} (head only); default {LORA}")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--targets", type=csv_list, default=(),
                   help="LoRA target linear names, e.g. query,value (default: query/value projections)")
    p.add_argument("--train-layers", type=int, default=None,
                   help="only the top K blocks carry adapters; the rest is a frozen inference-only "
                        "lower model (default: all blocks)")
    p.add_argument("--quant", default="int8",
                   help=f"{' | '.join(QUANT_SCHEMES)} (frozen backbone weights; default int8)")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size (default 32)")
    p.add_argument("--int4-int8-top", type=int, default=2, dest="int8_top_blocks",
                   help="int4 only: keep the linear weights of the top N blocks int8, and a causal LM's head and "
                        "embedding when N > 0 (default 2; 0 = all int4)")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per sample on device (default 128)")
    p.add_argument("--keep-attention", action="store_false", dest="recompute_attention",
                   help="hold attention probabilities for the backward pass instead of recomputing them "
                        "(MiniLM int8, 16 x 128: ~3%% faster steps, ~15%% more peak memory)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for adapters and head")
    p.add_argument("--model-id", default=None, help="name recorded in the manifest (default: derived)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--reference-dir", type=Path, default=None,
                   help="also keep ONNX Runtime Training's own artifacts here (training-only ops, AdamW graph, "
                        "checkpoint), for benchmarks and equivalence checks against the training build")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.bundler.config import BuildConfig, BuildError
    from edgeftl.models.loading import ModelError

    labels = args.labels
    if labels is None and args.num_labels is None and args.task == CLASSIFY and args.model is None:
        from edgeftl.device.data import bbc_labels

        labels = tuple(bbc_labels())
    try:
        config = BuildConfig(
            out=args.out, model=args.model, task=args.task, labels=labels or (), num_labels=args.num_labels,
            adapter=args.adapter, rank=args.rank, alpha=args.alpha, targets=args.targets,
            train_layers=args.train_layers, quant=args.quant, block_size=args.block_size,
            int8_top_blocks=args.int8_top_blocks,
            max_seq_len=args.max_seq_len, seed=args.seed, force=args.force, model_id=args.model_id,
            recompute_attention=args.recompute_attention, reference_dir=args.reference_dir,
        )
        from edgeftl.coordinator.bundler.pipeline import build

        manifest = build(config, progress=not args.quiet)
    except (BuildError, ModelError) as exc:
        return fail(str(exc))
    total = sum(entry.bytes for entry in manifest.files.values())
    print(f"built {args.out}: {manifest.quantization.scheme} backbone, "
          f"{manifest.trainable_count:,} trainable parameters, {total / 2**20:.1f} MiB on disk")
    return 0
