"""`make demo`: build a bundle from the packaged MiniLM, then train it on BBC News like a device would.

Until federation lands, this is the single-device story: build (host, torch) -> train on
local data (a separate torch-free process, as on a phone) -> evaluate on held-out articles.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgeftl.device.data import load_bbc, stratified_split, write_csv

ROOT = Path(__file__).resolve().parent.parent


def edgeftl(*args: str) -> subprocess.CompletedProcess:
    """Run the `edgeftl` CLI in a fresh process (the device step must never see torch)."""
    # stdout is captured (JSON / tables); progress bars go to stderr and stay visible.
    return subprocess.run([sys.executable, "-m", "edgeftl.coordinator.cli", *args], check=True,
                          stdout=subprocess.PIPE, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--quant", default="int8")
    parser.add_argument("--train-samples", type=int, default=480)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the bundle even if it exists")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.out / f"bundle-minilm-{args.quant}"

    print(f"[1/3] build: packaged all-MiniLM-L6-v2 -> {args.quant} backbone + LoRA r=8 + head -> {bundle}")
    if args.rebuild or not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "edgeftl.coordinator.cli", "build", "--quant", args.quant,
                        "--out", str(bundle), "--force"], check=True)
    print(edgeftl("inspect", str(bundle)).stdout)

    print("[2/3] data: BBC News, stratified split, shuffled (the device's local files)")
    texts, labels, _ = load_bbc()
    train_idx, test_idx = stratified_split(labels, test_fraction=0.2, seed=0)
    rng = np.random.default_rng(0)
    train_idx = rng.permutation(train_idx)[: args.train_samples]
    test_idx = rng.permutation(test_idx)[: args.test_samples]
    train_csv = write_csv(args.out / "train.csv", [texts[i] for i in train_idx], [labels[i] for i in train_idx])
    test_csv = write_csv(args.out / "test.csv", [texts[i] for i in test_idx], [labels[i] for i in test_idx])
    print(f"      {len(train_idx)} training and {len(test_idx)} held-out articles")

    print(f"[3/3] train on device (torch-free process): {args.steps} steps, batch 16")
    result = edgeftl("device", "train", "--bundle", str(bundle), "--data", str(train_csv), "--eval",
                     str(test_csv), "--steps", str(args.steps), "--batch", "16", "--lr", "1e-3", "--json")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (args.out / "device_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print()
    print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over {summary['steps']} steps; "
          f"held-out accuracy {summary['eval_accuracy']:.1%} on {summary['eval_samples']} articles")
    print(f"device peak RSS {summary['peak_rss_mib']} MiB, median step {summary['median_step_time_s']} s")
    print(f"summary written to {args.out / 'device_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
