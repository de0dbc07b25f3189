"""`edgeftl simulate`: build, split data non-IID, start a broker and N device processes, run rounds."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgeftl.coordinator.cli.coordinator import add_round_flags, config_from, round_line
from edgeftl.coordinator.rounds.records import METRICS
from edgeftl.device.cli.common import csv_list, fail
from edgeftl.device.protocol.manifest import ADAPTERS, LORA, TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=5)
    p.add_argument("--data", default="bbc", help="bbc (BBC News, packaged) or a CSV/JSONL file with text,label "
                   "(text only for causal-lm); without --bundle, the bundle is built for the file's own labels")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="classify, or causal-lm: next-token training on the texts alone, evaluated as held-out "
                        "perplexity (BBC articles split across devices by topic); default: the bundle's task, "
                        "classify when building")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label (topic) split")
    p.add_argument("--max-per-device", type=int, default=None, help="cap examples per device")
    p.add_argument("--max-test", type=int, default=None, help="cap held-out test examples")
    p.add_argument("--broker", default=None, help="mqtt://127.0.0.1:port of an open broker on this machine (a "
                   "simulation sends no credentials or signatures); default: start an embedded amqtt broker")
    p.add_argument("--bundle", type=Path, default=None, help="default: build --model into --out")
    p.add_argument("--model", type=Path, default=None,
                   help="local Hugging Face model folder (or smollm2) to build (default: the packaged "
                        "all-MiniLM-L6-v2; for causal-lm, smollm2)")
    p.add_argument("--quant", default="int8")
    p.add_argument("--adapter", default=LORA,
                   help=f"what a bundle built here trains: {' | '.join(ADAPTERS)} (edgeftl build --adapter); "
                        "ignored with --bundle")
    p.add_argument("--targets", type=csv_list, default=(),
                   help="linears a bundle built here adapts (edgeftl build --targets); ignored with --bundle")
    p.add_argument("--train-layers", type=int, default=None,
                   help="build with LoRA in the top K blocks only; devices cache the frozen lower stack's outputs")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per text of the bundle built here (default: the build's, 128); ignored with --bundle")
    p.add_argument("--device-threads", type=int, default=1)
    p.add_argument("--simulated-speed-spread", type=float, default=1.0,
                   help="SIMULATION ONLY: device i of n is slowed down spread^(i/(n-1)) times (each sleeps after "
                        "training; see `device run --simulated-slowdown`), for fleets of mixed speeds; default 1")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    add_round_flags(p)


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.cli.live import LiveView
    from edgeftl.coordinator.simulation.simulate import SimulationConfig, run_labels, simulate

    try:
        rounds = config_from(args, args.out)
        if args.wait_devices == 1:
            rounds.wait_devices = args.devices
        sim = SimulationConfig(out=args.out, devices=args.devices, data=args.data, task=args.task, alpha=args.alpha,
                               max_per_device=args.max_per_device, max_test=args.max_test, broker=args.broker,
                               bundle=args.bundle, model=args.model, quant=args.quant,
                               adapter=args.adapter, targets=tuple(args.targets),
                               train_layers=args.train_layers, max_seq_len=args.max_seq_len,
                               device_threads=args.device_threads,
                               simulated_speed_spread=args.simulated_speed_spread, seed=args.seed)
        labels = run_labels(sim)  # a data/bundle mismatch is one line before any work
    except ValueError as exc:
        return fail(str(exc))
    began = time.monotonic()
    print(f"simulating {args.devices} devices x {args.rounds} rounds -> {args.out}; "
          f"labels: {', '.join(labels) or '(none: causal-lm)'}", file=sys.stderr)
    try:
        with LiveView(rounds.rounds, rounds.deadline_s, round_line) as view:  # plain lines when not a terminal
            records = simulate(sim, rounds, on_round=view.on_round, on_start=view.attach)
    except (ValueError, RuntimeError) as exc:
        return fail(str(exc))
    last = records[-1] if records else {}
    summary = {
        "rounds": len(records),
        "labels": labels,
        **({"final_perplexity": last.get("perplexity"), "final_loss": last.get("loss")} if not labels
           else {"final_accuracy": last.get("accuracy")}),
        "bytes_up_total": sum(r["bytes_up"] for r in records),
        "bytes_down_total": sum(r["bytes_down"] for r in records),
        "device_peak_rss_mib": max((r["device_peak_rss_mib"] for r in records), default=0),
        "wall_s": round(time.monotonic() - began, 1),
        "metrics": str(args.out / METRICS),
    }
    print(json.dumps(summary, indent=2))
    return 0
