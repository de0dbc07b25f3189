"""`make demo`: a federation of MiniLM devices learning BBC News topics, on this machine.

Reads like the pipeline it runs:
  1. build  - the packaged all-MiniLM-L6-v2 -> int8 backbone + LoRA-XS r=8 (an 8 x 8 core in every linear
              of its 6 blocks) and the head: 4,229 trainable values (host, torch)
  2. split  - BBC News: 20% held out; the rest split non-IID (Dirichlet alpha 0.5) over the devices
  3. broker - an embedded MQTT broker (amqtt) on a free loopback port
  4. devices- one torch-free process each: train on every task (a bundle adapting fewer blocks lets them
              cache its frozen lower stack)
  5. rounds - the coordinator samples, collects compressed updates, aggregates (FedAvg), evaluates
  6. report - runs/demo/report.html: accuracy, bytes, device memory and training time, plotted
Everything is written under runs/demo/: metrics.jsonl (one record per round), the bundle, data,
device logs, the report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgeftl.coordinator.report.summary import fmt_bytes
from edgeftl.coordinator.report.targets import final_accuracy, reach

ROOT = Path(__file__).resolve().parent.parent
# A fp32 update of the default LoRA bundle (r=8 on query/value of the top 2 blocks + head: 26,501 values), as
# bench_federation measured it: what the demo's updates are compared to.
LORA_FP32_UPDATE = 106_575


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="local steps per device per round")
    # The fewest bytes to fp32 LoRA's accuracy measured on BBC (docs/BENCHMARKS.md, bench_federation): a
    # lora-xs bundle adapting every linear of every block, lr 0.02, sign up and down.
    parser.add_argument("--adapter", default="lora-xs", help="what the bundle trains (edgeftl build --adapter)")
    parser.add_argument("--targets", default="query,key,value,dense", help="the linears it adapts")
    parser.add_argument("--train-layers", default="6", help="the top blocks it adapts (MiniLM has 6)")
    parser.add_argument("--lr", default="0.02", help="local learning rate (lora-xs trains 8 x 8 cores: 10x LoRA's)")
    parser.add_argument("--codec", default="sign", help="uplink codec (error feedback on devices)")
    parser.add_argument("--downlink", default="sign", help="codec of the per-round global delta (error feedback on "
                                                           "the coordinator)")
    args = parser.parse_args()
    command = [sys.executable, "-m", "edgeftl.device.cli", "simulate", "--devices", str(args.devices),
               "--alpha", "0.5", "--rounds", str(args.rounds), "--steps", str(args.steps), "--lr", args.lr,
               "--train-layers", args.train_layers, "--adapter", args.adapter, "--targets", args.targets,
               "--codec", args.codec, "--downlink", args.downlink, "--out", str(args.out)]
    print("$ edgeftl " + " ".join(command[3:]), flush=True)
    result = subprocess.run(command)  # its round lines stream as they come (captured, they showed only at the end)
    if result.returncode:
        return result.returncode
    records = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    up = sum(r["bytes_up"] for r in records)
    fp32 = 4 * json.loads((args.out / "config.json").read_text())["bundle"]["trainable_params"]
    sent = sum(r["updates_received"] for r in records)
    print()
    print(f"held-out accuracy {first['accuracy']:.1%} after round 0 -> {last['accuracy']:.1%} after round "
          f"{last['round']} ({args.devices} devices, non-IID)")
    print(f"uplink {up / 1024:.0f} KiB in {sent} updates: {up / max(1, sent) / 1024:.1f} KiB each, "
          f"{fp32 * sent / max(1, up):.0f}x less than fp32 updates of this bundle ({args.codec}; bench_federation's "
          f"fp32 LoRA baseline, r=8 on query/value of the top 2 blocks, sends {LORA_FP32_UPDATE / 1024:.0f} KiB per "
          f"update: {LORA_FP32_UPDATE * sent / max(1, up):.0f}x)")
    down = sum(r["bytes_down"] for r in records)
    print(f"downlink {down / 1024:.0f} KiB to {args.devices} devices over {len(records)} rounds ({args.downlink} "
          f"deltas; round 0 starts from the bundle's own values; fp32 would be {fp32 * sent / 1024:.0f} KiB)")
    final = final_accuracy(records)
    cost = reach(records, final) if final is not None else None
    if cost is not None:  # what users pay for: the bytes until the model was as good as it got
        print(f"to reach its final accuracy ({final:.1%}): {cost.rounds} rounds, {fmt_bytes(cost.bytes_up)} up, "
              f"{fmt_bytes(cost.bytes_down)} down")
    print(f"device peak memory {max(r['device_peak_rss_mib'] for r in records):.0f} MiB; "
          f"per-round records in {args.out / 'metrics.jsonl'}")
    report = subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "report", str(args.out)])
    if report.returncode:
        return report.returncode
    print(f"report: {args.out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
