"""Coordinator scale: time to validate, decode and aggregate N MiniLM-LoRA-sized updates.

    .venv/bin/python tools/bench_coordinator.py            # 1,000 updates per codec
    .venv/bin/python tools/bench_coordinator.py --quick    # 200

Updates are real wire messages (header + codec arrays) of the full-depth MiniLM LoRA bundle's
size (75,653 trainable values, read from a bundle manifest when --bundle is given). Decoding
goes through the coordinator's own inbox (size check, header, run/bundle/round/device checks,
codec decode, finiteness); aggregation through the strategies. One process, single thread
numpy; wall-clock medians of --repeats. Results: docs/bench_coordinator.json and the
`bench_coordinator` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Single-threaded BLAS, as stated above, set before numpy loads. With a BLAS thread per core,
# LoRA-SVD over 200 updates took 26 s per codec while another process shared the 2 cores,
# against 1.7 s for 1,000 updates on the quiet machine.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np

from edgeftl.coordinator.rounds.inbox import Inbox
from edgeftl.coordinator.rounds.strategy import Update, make_strategy
from edgeftl.device.measure import platform_info
from edgeftl.device.protocol.codecs import parse_codec
from edgeftl.device.protocol.manifest import LoraFactor, TrainableParam
from edgeftl.device.protocol.messages import Update as UpdateMessage
from edgeftl.device.protocol.messages import decode, encode

import benchdoc

ROOT = Path(__file__).resolve().parent.parent
SIZE = 75_653  # MiniLM, LoRA r=8 on query/value in 6 blocks + 5-label head
CODECS = ("none", "fp16", "int8", "topk:0.01+int8")


def layout_for(size: int) -> list[TrainableParam]:
    """A MiniLM-shaped LoRA layout: 6 blocks x (query, value) x (A 8x384, B 384x8), then the head."""
    entries, offset = [], 0
    for block in range(6):
        for target in ("query", "value"):
            layer = f"b{block}.{target}"
            for factor, shape in (("A", [8, 384]), ("B", [384, 8])):
                entries.append(TrainableParam(f"{layer}.lora_{factor}", shape, "float32", offset,
                                              LoraFactor(layer, factor)))
                offset += shape[0] * shape[1]
    entries.append(TrainableParam("head", [size - offset], "float32", offset))
    return entries


def make_messages(codec: str, count: int, rng: np.random.Generator) -> list[bytes]:
    c = parse_codec(codec)
    messages = []
    for i in range(count):
        encoded = c.encode(rng.normal(scale=1e-3, size=SIZE).astype(np.float32))
        messages.append(encode(UpdateMessage("bench", 0, "0" * 64, f"dev{i:04d}", 100 + i, 1, encoded)))
    return messages


def time_decode(messages: list[bytes]) -> tuple[float, list[Update]]:
    """What the coordinator does per update: the link's decode and checks, then the inbox's."""
    inbox = Inbox("bench", "0" * 64, SIZE)
    inbox.open_round(0, [f"dev{i:04d}" for i in range(len(messages))])
    began = time.perf_counter()
    updates = []
    for payload in messages:
        message = decode(payload, 64 * 1024 * 1024)
        assert isinstance(message, UpdateMessage)
        item = inbox.take(message, len(payload))
        if item is not None:
            updates.append(Update(item.delta, float(item.update.samples)))
    elapsed = time.perf_counter() - began
    if len(updates) != len(messages):
        raise RuntimeError(f"only {len(updates)} of {len(messages)} updates decoded: {dict(inbox.rejected)}")
    return elapsed, updates


def time_aggregate(strategy_name: str, updates: list[Update]) -> float:
    strategy = make_strategy(strategy_name, layout_for(SIZE))
    began = time.perf_counter()
    strategy.aggregate(np.zeros(SIZE, np.float32), updates)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 updates, 1 repeat")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.repeats = 200, 1
    rng = np.random.default_rng(0)
    rows = []
    for codec in CODECS:
        messages = make_messages(codec, args.updates, rng)
        nbytes = sum(len(p) for p in messages)
        decode_times, updates = [], []
        for _ in range(args.repeats):
            elapsed, updates = time_decode(messages)
            decode_times.append(elapsed)
        row = {"codec": parse_codec(codec).spec, "updates": args.updates, "payload_mib": nbytes / 2**20,
               "decode_s": statistics.median(decode_times)}
        for name in ("fedavg", "fedadam", "lora-svd"):
            row[f"{name}_s"] = statistics.median(time_aggregate(name, updates) for _ in range(args.repeats))
        rows.append(row)
        print(f"{row['codec']:>18}: decode {row['decode_s']:.2f} s, fedavg {row['fedavg_s']:.2f} s, "
              f"lora-svd {row['lora-svd_s']:.2f} s", file=sys.stderr)
    header = ("| codec | updates | payload MiB | validate + decode s | FedAvg s | FedAdam s | LoRA-SVD s | "
              "total (decode + FedAvg) s |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['updates']} | {r['payload_mib']:.1f} | {r['decode_s']:.2f} | "
                     f"{r['fedavg_s']:.2f} | {r['fedadam_s']:.2f} | {r['lora-svd_s']:.2f} | "
                     f"{r['decode_s'] + r['fedavg_s']:.2f} |")
    info = platform_info()
    section = "\n".join([
        "<!-- bench_coordinator:start -->",
        "## Coordinator scale (`tools/bench_coordinator.py`)",
        "",
        f"{args.updates} MiniLM-LoRA-sized updates ({SIZE:,} values each) per codec, through the coordinator's "
        f"inbox (all validation included) and the aggregation strategies; median of {args.repeats}, one process, "
        f"{info['platform_machine']} with {info['platform_cpu_count']} CPUs, Python {info['platform_python']}.",
        "",
        *lines,
        "<!-- bench_coordinator:end -->",
    ])
    print(section)
    if not args.no_write:
        benchdoc.write_section("bench_coordinator", section)
        (ROOT / "docs" / "bench_coordinator.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
