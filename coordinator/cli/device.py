"""`edgeftl device ...`: the on-device agent (torch-free)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeftl.coordinator.cli._common import fail


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("device", help="on-device commands (torch-free)", description=__doc__)
    dsub = p.add_subparsers(dest="device_command", required=True)
    t = dsub.add_parser("train", help="train a bundle on a local data file")
    t.add_argument("--bundle", type=Path, required=True)
    t.add_argument("--data", type=Path, required=True, help="CSV (text,label) or JSONL")
    t.add_argument("--eval", type=Path, default=None, help="validation file (same format)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--micro-batch", type=int, default=None,
                   help="samples per forward/backward pass (exact gradient accumulation within a batch; "
                        "peak memory follows it); default: the whole batch")
    t.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from edgeftl.device.data import DataError
    from edgeftl.device.manifest import BundleError
    from edgeftl.device.train import TrainConfig, train_file

    try:
        config = TrainConfig(epochs=args.epochs, steps=args.steps, batch=args.batch, lr=args.lr,
                             seed=args.seed, threads=args.threads,
                             micro_batch=args.micro_batch, grad_accum=args.grad_accum)
        summary = train_file(args.bundle, args.data, args.eval, config, progress=not args.quiet)
    except (DataError, BundleError, ValueError) as exc:
        return fail(str(exc))
    if args.json:
        import json

        print(json.dumps(summary, sort_keys=True))
    else:
        for key, value in summary.items():
            print(f"{key:22s} {value}")
    return 0
