"""`edgeftl device ...`: the on-device agent (torch-free)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    dsub = p.add_subparsers(dest="device_command", required=True)
    _add_train(dsub.add_parser("train", help="train a bundle on a local data file"))
    _add_plan(dsub.add_parser("plan", help="estimate peak memory of training before running it"))
    from edgeftl.device.cli.run import add_run

    add_run(dsub.add_parser("run", help="join a federation over MQTT and train on each task"))
    _add_supervise(dsub.add_parser("supervise", help="keep a flashed agent running (restarts, log); "
                                   "what `edgeftl flash` starts where there is no systemd"))


def _add_train(t: argparse.ArgumentParser) -> None:
    t.add_argument("--bundle", type=Path, required=True)
    t.add_argument("--data", type=Path, required=True, help="CSV (text,label) or JSONL")
    t.add_argument("--eval", type=Path, default=None, help="validation file (same format)")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this seeded share of --data for evaluation instead of --eval")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--steps", type=int, default=None, help="batches to train in total (a resumed state counts)")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--micro-batch", type=int, default=None,
                   help="samples per forward/backward pass (exact gradient accumulation within a batch; "
                        "peak memory follows it); default: the whole batch")
    t.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--state", type=Path, default=None,
                   help="local state folder: resumed from if present, saved at the end and every --save-every")
    t.add_argument("--save-every", type=int, default=None, help="batches between state saves (needs --state)")
    t.add_argument("--cache-dir", type=Path, default=None,
                   help="where a split bundle's lower-stack outputs are cached (default: $EDGEFTL_CACHE "
                        "or ~/.cache/edgeftl)")
    t.add_argument("--no-cache", action="store_true", help="recompute the lower stack every epoch")
    t.add_argument("--max-memory-mib", type=float, default=None,
                   help="measure the peak first; shrink the micro-batch to fit, or refuse if nothing fits")
    t.add_argument("--metrics", type=Path, default=None, help="append the summary as a JSON line to this file")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True, help="sequence length in tokens (at most the bundle's)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--max-memory-mib", type=float, default=None, help="also report the largest micro-batch that fits")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON line on stdout")


def _add_supervise(s: argparse.ArgumentParser) -> None:
    s.add_argument("--root", type=Path, required=True, help="the flashed install folder (config/agent.json in it)")
    s.add_argument("--foreground", action="store_true", help="stay in the foreground (as a systemd service)")


def run(args: argparse.Namespace) -> int:
    if args.device_command == "supervise":  # before the imports below: the supervisor never loads numpy
        from edgeftl.device.supervise import supervise

        try:
            return supervise(args.root, args.foreground)
        except (ValueError, OSError) as exc:
            return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    from edgeftl.device.cli.run import run_device
    from edgeftl.device.data import DataError
    from edgeftl.device.protocol.manifest import BundleError

    handler = {"train": _train, "plan": _plan, "run": run_device}[args.device_command]
    try:
        record = handler(args)
    except (DataError, BundleError, ValueError, RuntimeError, OSError) as exc:
        return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if getattr(args, "json", False):
        print(json.dumps(record, sort_keys=True))
    else:
        _print_table(record)
    return 0


def _train(args: argparse.Namespace) -> dict:
    from edgeftl.device.cache import default_cache_dir
    from edgeftl.device.train import TrainConfig, train_file

    if args.save_every and not args.state:
        raise ValueError("--save-every needs --state DIR")
    config = TrainConfig(epochs=args.epochs, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                         threads=args.threads, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                         val_fraction=args.val_fraction, save_every=args.save_every,
                         max_memory_mib=args.max_memory_mib)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    return train_file(args.bundle, args.data, args.eval, config, progress=not args.quiet,
                      state_dir=args.state, cache_dir=cache_dir, metrics=args.metrics)


def _plan(args: argparse.Namespace) -> dict:
    from edgeftl.device.plan import measure_plan
    from edgeftl.device.protocol.manifest import verify_bundle

    manifest = verify_bundle(args.bundle)
    for name in ("batch", "micro_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not 1 <= args.seq <= manifest.max_seq_len:
        raise ValueError(f"--seq {args.seq} is outside 1..{manifest.max_seq_len} (the bundle's max_seq_len)")
    plan = measure_plan(args.bundle, args.seq, args.threads, micro_batch=args.micro_batch or args.batch,
                        limit_mib=args.max_memory_mib)
    return plan.report(args.batch, args.micro_batch, args.max_memory_mib)


def _print_table(record: dict) -> None:
    platform = {k: v for k, v in record.items() if k.startswith("platform_")}
    for key, value in record.items():
        if key not in platform:
            print(f"{key:28s} {value}")
    if platform:
        print(f"{'platform':28s} {platform.get('platform_machine')} {platform.get('platform_system')}, "
              f"{platform.get('platform_cpu_count')} CPUs, {platform.get('platform_total_memory_mib')} MiB, "
              f"Python {platform.get('platform_python')}")
