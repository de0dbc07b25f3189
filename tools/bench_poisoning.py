"""Model poisoning on BBC News: final accuracy per aggregator x attack, against the honest run.

    .venv/bin/python tools/bench_poisoning.py                       # every case below, ~40 min on 2 cores
    .venv/bin/python tools/bench_poisoning.py --cases honest,scale@fedavg,scale@median --merge

Every case is a real federation (embedded broker, one torch-free process per device, the packaged
MiniLM int8 split bundle with LoRA in the top 2 blocks) on the same Dirichlet split and seed. Two of
the devices are attackers: real device processes (`tools/poison.py`) that train on their own data
like the others and transform their real update before sending it:

- `scale`: the delta x50 and the sample count claimed as 10**6 (a boosted update that also games
  FedAvg's sample weighting);
- `flip`: the delta x-5 (sign-flipped and boosted: pushes the global against the honest direction).

Aggregators: `fedavg` (no guard: no clipping, no weight cap), `fedavg+clip` (clip at the honest run's
median update norm, weights capped at 10x the median), `median`, `trimmed-mean` (fraction 0.2),
`krum` and `multi-krum` (f = 2, m = n - f). Results: docs/bench_poisoning.json and the
`bench_poisoning` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.simulation.simulate import SimulationConfig, simulate
from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.manifest import MANIFEST

import benchdoc

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = {"scale": ["--scale", "50", "--samples", "1000000"], "flip": ["--scale", "-5"]}
AGGREGATORS = ("fedavg", "fedavg+clip", "median", "trimmed-mean", "krum", "multi-krum")
ALL_CASES = ["honest", *(f"{attack}@{agg}" for agg in AGGREGATORS for attack in ATTACKS)]


def round_config(out: Path, aggregator: str, clip_norm: float, args: argparse.Namespace) -> CoordinatorConfig:
    """The coordinator settings of one aggregator; everything else is the same in every case."""
    strategy = "fedavg" if aggregator.startswith("fedavg") else aggregator
    guarded = aggregator == "fedavg+clip"
    return CoordinatorConfig(out=out, rounds=args.rounds, steps=args.steps, lr=args.lr, strategy=strategy,
                             clip_norm=clip_norm if guarded else 0.0,
                             max_weight_ratio=10.0 if guarded or strategy != "fedavg" else 0.0,
                             trim_fraction=0.2, byzantine=args.attackers if "krum" in strategy else 0,
                             wait_devices=args.devices, wait_devices_s=300, deadline_s=300, seed=0)


def run_case(case: str, clip_norm: float, args: argparse.Namespace) -> list[dict]:
    attack, _, aggregator = case.partition("@")
    sim = SimulationConfig(out=args.work, devices=args.devices, alpha=args.alpha, bundle=args.bundle, seed=0)
    attackers = [] if attack == "honest" else [f"dev{i:02d}" for i in range(args.devices - args.attackers,
                                                                                   args.devices)]
    program = [sys.executable, str(ROOT / "tools" / "poison.py"), *ATTACKS.get(attack, []), "--"]
    config = round_config(args.work / case.replace("@", "_").replace("+", "_"), aggregator or "fedavg", clip_norm,
                          args)

    def show(record: dict) -> None:
        print(f"{case} round {record['round']}: accuracy {record['accuracy']:.3f} loss {record['loss']:.3f} "
              f"norm max {record.get('update_norm_max', 0):.2f} median {record.get('update_norm_median', 0):.2f}",
              file=sys.stderr)

    return simulate(sim, config, show, programs={name: program for name in attackers})


def honest_clip_norm(honest: list[dict]) -> float:
    """The clip norm of `fedavg+clip`: the median over rounds of the honest run's median update norm."""
    return round(float(np.median([r["update_norm_median"] for r in honest])), 3)


def summary(records: list[dict]) -> dict:
    keep = ("round", "accuracy", "loss", "update_norm_max", "update_norm_median", "updates_clipped",
            "weights_capped", "updates_received", "wall_s", "strategy_report")
    return {"final_accuracy": records[-1]["accuracy"], "final_loss": records[-1]["loss"],
            "rounds": [{k: r[k] for k in keep if k in r} for r in records]}


def table(results: dict) -> str:
    honest = results["cases"].get("honest")
    base = honest["final_accuracy"] if honest else None
    lines = ["| aggregator | " + " | ".join(f"attack `{a}`" for a in ATTACKS) + " |",
             "|---|" + "---|" * len(ATTACKS)]
    for aggregator in AGGREGATORS:
        cells = []
        for attack in ATTACKS:
            case = results["cases"].get(f"{attack}@{aggregator}")
            if case is None:
                cells.append("not run")
                continue
            acc = case["final_accuracy"]
            delta = f" ({(acc - base) * 100:+.1f} pt)" if base is not None else ""
            cells.append(f"{acc:.1%}{delta}, loss {case['final_loss']:.2f}")
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    if honest:
        lines.append(f"| honest run (no attackers, fedavg) | {base:.1%}, loss {honest['final_loss']:.2f} |"
                     + " |" * (len(ATTACKS) - 1))
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    s = results["settings"]
    walls = ", ".join(f"{case} {sec:.0f} s" for case, sec in results["wall_s"].items())
    section = "\n".join([
        "<!-- bench_poisoning:start -->",
        "## Model poisoning: robust aggregation on BBC News (`tools/bench_poisoning.py`)",
        "",
        f"{s['devices']} devices, Dirichlet alpha {s['alpha']}, {s['attackers']} of them attackers (the last "
        f"{s['attackers']} device ids), {s['rounds']} rounds of {s['steps']} local steps (batch 16, lr {s['lr']}), "
        "packaged MiniLM int8 with LoRA r=8 in the top 2 blocks only (the split bundle: a short budget on 2 "
        "shared cores, so fewer rounds and steps than `bench_federation`), fp32 updates, embedded broker, "
        "every device its own process. Attackers train honestly and then send `scale`: their delta x50 "
        "claiming 10**6 samples, or `flip`: their delta x-5. `fedavg` has no guard; `fedavg+clip` clips every "
        f"update to L2 {s['clip_norm']} (the honest run's median update norm) and caps weights at 10x the "
        "round's median; trimmed mean drops 20% per side; krum and multi-krum assume f = 2 (multi-krum "
        "averages n - f = 8). Final held-out accuracy (20% of BBC, stratified) after the last round, and its "
        f"difference to the honest run. Run on {s['machine']}; {walls}.",
        "",
        table(results),
        "<!-- bench_poisoning:end -->",
    ])
    benchdoc.write_section("bench_poisoning", section)
    print(section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchdoc.add_federation_args(parser, "bench_poisoning", rounds=8)
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--cases", default=",".join(ALL_CASES),
                        help=f"comma-separated: honest, or attack@aggregator with attack in {', '.join(ATTACKS)} "
                             f"and aggregator in {', '.join(AGGREGATORS)}")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cases of docs/bench_poisoning.json not run now (same settings)")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; accepted: {', '.join(ALL_CASES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.bundle = args.work / "bundle-int8-top2"
    if not (args.bundle / MANIFEST).is_file():
        subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "build", "--quant", "int8", "--train-layers", "2",
                        "--out", str(args.bundle), "--force", "--quiet"], check=True)
    path = ROOT / "docs" / "bench_poisoning.json"
    previous = json.loads(path.read_text()) if args.merge and path.is_file() else {"cases": {}, "wall_s": {}}
    results = {"cases": previous["cases"], "wall_s": previous["wall_s"]}
    clip_norm = previous.get("settings", {}).get("clip_norm")
    for case in sorted(cases, key=lambda c: c != "honest"):  # the honest run first: it sets the clip norm
        started = time.monotonic()
        if case != "honest" and clip_norm is None:
            parser.error("run the honest case first (or with --merge after it): fedavg+clip clips at its norm")
        records = run_case(case, clip_norm or 0.0, args)
        results["cases"][case] = summary(records)
        results["wall_s"][case] = round(time.monotonic() - started, 1)
        if case == "honest":
            clip_norm = honest_clip_norm(records)
        results["settings"] = settings(args, clip_norm)
        atomic_write(path, (json.dumps(results, indent=1, sort_keys=True) + "\n").encode())  # partial runs count
    write_doc(results)
    return 0


def settings(args: argparse.Namespace, clip_norm: float | None) -> dict:
    from edgeftl.device.measure import platform_info

    info = platform_info()
    return {"devices": args.devices, "attackers": args.attackers, "alpha": args.alpha, "rounds": args.rounds,
            "steps": args.steps, "lr": args.lr, "clip_norm": clip_norm, "attacks": ATTACKS,
            "machine": f"{info['platform_machine']}, {info['platform_cpu_count']} CPUs", **benchdoc.git_state()}


if __name__ == "__main__":
    sys.exit(main())
