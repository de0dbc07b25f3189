"""Federated causal-LM fine-tuning of SmolLM2: held-out perplexity per round against centralized LoRA.

    .venv/bin/python tools/bench_llm_federation.py                      # 10 devices, 20 rounds
    .venv/bin/python tools/bench_llm_federation.py --rounds 2 --work runs/llm-quick --no-doc   # timing probe

SmolLM2-135M-Instruct (`--model smollm2`) as an int8 bundle with LoRA in the top 2 blocks, 64 tokens;
BBC News articles as text alone, split across the devices by topic (Dirichlet alpha), the held-out
articles from every topic. Every case is a real `edgeftl simulate --task causal-lm` run (embedded
broker, one torch-free process per device) on the same bundle, split and seed: fp32 uplink
(`none`) and the compressed uplink of the MiniLM benchmark (`topk:0.01+int8`, error feedback on
the devices). Centralized LoRA trains one process on the union of the devices' texts for the same
optimizer steps (`bench_federation.centralized`). Results: docs/bench_llm_federation.json and the
`bench_llm_federation` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_federation

from edgeftl.device.protocol.manifest import MANIFEST

import benchdoc

ROOT = Path(__file__).resolve().parent.parent
NAME = "bench_llm_federation"
CENTRAL_GAP = 0.05  # federated fp32 perplexity within 5% of centralized after the last round
CODEC_GAP, CODEC_RATIO = 0.02, 50  # compressed: within 2% of fp32-uplink perplexity, >= 50x fewer bytes


def build_bundle(args: argparse.Namespace) -> Path:
    bundle = args.work / f"bundle-int8-top2-{args.max_seq_len}"
    if not (bundle / MANIFEST).is_file():
        subprocess.run([*bench_federation.CLI, "build", "--model", "smollm2", "--task", "causal-lm", "--quant", "int8",
                        "--train-layers", "2", "--max-seq-len", str(args.max_seq_len), "--out", str(bundle),
                        "--force", "--quiet"], check=True)
    return bundle


def uplink_per_update(records: list[dict]) -> float:
    return sum(r["bytes_up"] for r in records) / max(1, sum(r["updates_received"] for r in records))


def table(results: dict) -> str:
    fed, central = results["federated"], results["centralized"]
    lines = ["| round | " + " | ".join(f"fed {c}" for c in fed) + " | centralized |", "|---|" + "---|" * (len(fed) + 1)]
    for r in range(results["settings"]["rounds"]):
        cells = [f"{fed[c][r]['perplexity']:.2f}" if r < len(fed[c]) else "-" for c in [*fed, None] if c]
        cells.append(f"{central[r]['perplexity']:.2f}" if r < len(central) else "-")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """PASS/MISS per target, with the margin."""
    fed, central = results["federated"], results["centralized"]
    lines = []
    base = fed.get("none")
    if base and central:
        gap = base[-1]["perplexity"] / central[-1]["perplexity"] - 1
        lines.append(f"- {'PASS' if gap <= CENTRAL_GAP else 'MISS'} federated fp32-uplink perplexity within "
                     f"{CENTRAL_GAP:.0%} of centralized after {len(base)} rounds: {base[-1]['perplexity']:.2f} vs "
                     f"{central[-1]['perplexity']:.2f} ({gap:+.1%})")
    if base and central:
        lines.extend(best_against_best(base, central, results["settings"]))
    for case, records in fed.items():
        if case == "none" or not base:
            continue
        ratio = uplink_per_update(base) / uplink_per_update(records)
        gap = records[-1]["perplexity"] / base[-1]["perplexity"] - 1
        ok = ratio >= CODEC_RATIO and gap <= CODEC_GAP
        lines.append(f"- {'PASS' if ok else 'MISS'} {case}: {ratio:.1f}x fewer uplink bytes "
                     f"(target >= {CODEC_RATIO}x), "
                     f"perplexity {records[-1]['perplexity']:.2f} vs {base[-1]['perplexity']:.2f} fp32 uplink "
                     f"({gap:+.1%}; target within {CODEC_GAP:.0%})")
    return lines


def best_against_best(base: list[dict], central: list[dict], settings: dict) -> list[str]:
    """The comparison that does not depend on where the 20th round falls: each side's best round, and
    a note when centralized LoRA ended well above its best (it overfits the union of the devices' texts)."""
    at = min(range(len(central)), key=lambda r: central[r]["perplexity"])
    best_fed = min(r["perplexity"] for r in base)
    gap = best_fed / central[at]["perplexity"] - 1
    steps = settings["devices"] * settings["steps"]
    lines = [f"- {'PASS' if gap <= CENTRAL_GAP else 'MISS'} best against best: federated fp32 uplink {best_fed:.2f} "
             f"vs centralized {central[at]['perplexity']:.2f} after round {at} ({(at + 1) * steps} steps), {gap:+.1%}"]
    if central[-1]["perplexity"] > (1 + CENTRAL_GAP) * central[at]["perplexity"]:
        union = settings["devices"] * settings["max_per_device"]  # at most: a device may hold fewer articles
        epochs = len(central) * steps * settings["batch"] / union
        lines.append(f"- Centralized LoRA overfits: after round {at} its held-out perplexity rises to "
                     f"{central[-1]['perplexity']:.2f} ({len(central) * steps} steps of batch {settings['batch']} are "
                     f"at least {epochs:.0f} epochs over the union of at most {union} articles), so the last-round "
                     "comparison above favours the federation; the best-round one is the fair one.")
    return lines


def bytes_table(results: dict) -> str:
    lines = ["| uplink codec | bytes per update | total uplink | final held-out perplexity | wall |",
             "|---|---|---|---|---|"]
    for case, records in results["federated"].items():
        lines.append(f"| {case} | {uplink_per_update(records):,.0f} | {sum(r['bytes_up'] for r in records):,} | "
                     f"{records[-1]['perplexity']:.2f} | {results['wall_s'].get(case, 0):.0f} s |")
    return "\n".join(lines)


def reading(results: dict) -> list[str]:
    """Why the federated and centralized curves differ, from the settings (shown beside a miss)."""
    s = results["settings"]
    return ["", f"Why: in a round each device takes {s['steps']} steps from the same global and FedAvg averages the "
            f"{s['devices']} updates, so the global moves about as far as {s['steps']} steps of a "
            f"{s['devices']}x larger batch; centralized LoRA takes all {s['devices'] * s['steps']} steps one after "
            "another. While the held-out loss is still falling, the sequential run is ahead "
            "by construction; the gap closes only once both approach the adapter's floor on this data."]


def codec_reading(results: dict) -> list[str]:
    """Why a compressed uplink trails fp32: its gap per round, early and last (shown when one misses)."""
    fed = results["federated"]
    base = fed.get("none")
    lagging = {case: [r["perplexity"] / b["perplexity"] - 1 for r, b in zip(records, base)]
               for case, records in fed.items() if base and case != "none"}
    lagging = {case: gaps for case, gaps in lagging.items() if gaps[-1] > CODEC_GAP}
    if not lagging:
        return []
    mid = len(base) // 4
    trend = "; ".join(f"{case} {gaps[mid]:+.1%} at round {mid}, {gaps[-1]:+.1%} at round {len(gaps) - 1}"
                      for case, gaps in lagging.items())
    return ["", "Why the compressed uplinks trail: every round's LoRA update is dense (all "
            f"{results['settings']['trainable']:,} values move a little in {results['settings']['steps']} steps), "
            "so top-k ships 1-2% of it and the devices' error feedback banks the rest for later rounds; the global "
            f"lags fp32 by a few rounds and closes the gap slowly ({trend}). Within "
            f"{results['settings']['rounds']} rounds it does not reach 2%; whether more rounds do is not measured "
            "here, and a denser top-k gives up the 50x (indices cost 2 bytes a value)."]


def write_doc(results: dict) -> None:
    s = results["settings"]
    start = results["centralized"][0]["perplexity"] if results["centralized"] else None
    section = "\n".join([
        f"<!-- {NAME}:start -->",
        "## Federated causal-LM: SmolLM2 on BBC News text (`tools/bench_llm_federation.py`)",
        "",
        f"SmolLM2-135M-Instruct int8, LoRA r=8 on q/v in the top 2 blocks ({s['trainable']:,} trainable values, the "
        f"lower 28 blocks cached on the devices), {s['max_seq_len']} tokens; {s['devices']} devices, BBC articles as "
        f"text only, Dirichlet alpha {s['alpha']} over the 5 topics, at most {s['max_per_device']} articles per "
        f"device, {s['max_test']} held-out articles from every topic; {s['rounds']} rounds of {s['steps']} local steps "
        f"of batch {s['batch']}, lr {s['lr']}, FedAvg, every device its own process. Centralized: one process, the "
        f"union of the devices' texts, the same {s['devices'] * s['steps']} steps per round. Perplexity = exp(mean "
        "held-out loss per predicted token)"
        + (f"; the centralized model's after one round's steps was {start:.2f}." if start else ".")
        + f" Run on {s['machine']}; {s['wall_s']:.0f} s in all.",
        "",
        table(results), "", bytes_table(results), "", *verdicts(results),
        *(reading(results) if any(v.startswith("- MISS federated") for v in verdicts(results)) else []),
        *codec_reading(results),
        f"<!-- {NAME}:end -->",
    ])
    benchdoc.write_section(NAME, section)
    (ROOT / "docs" / f"{NAME}.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchdoc.add_federation_args(parser, NAME, rounds=20)
    parser.set_defaults(steps=2, lr=5e-3)
    parser.add_argument("--codecs", default="none,topk:0.01+int8", help="comma-separated uplink codecs")
    parser.add_argument("--batch", type=int, default=4, help="local batch (texts per step)")
    parser.add_argument("--max-seq-len", type=int, default=64, help="tokens per text in the bundle")
    parser.add_argument("--max-per-device", type=int, default=16, help="cap each device's articles")
    parser.add_argument("--deadline-s", type=float, default=900, help="round deadline: 2 cores run 10 devices")
    parser.add_argument("--no-central", action="store_true")
    parser.add_argument("--no-doc", action="store_true", help="print the results only (timing probes)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cases and the centralized run of docs/bench_llm_federation.json (same "
                             "settings) and add or replace only the codecs run now")
    parser.add_argument("--doc-only", action="store_true",
                        help="rewrite the docs/BENCHMARKS.md section from docs/bench_llm_federation.json; run nothing")
    args = parser.parse_args()
    if args.doc_only:
        write_doc(json.loads((ROOT / "docs" / f"{NAME}.json").read_text()))
        return 0
    began = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    args.bundle = build_bundle(args)
    flags = ["--batch", str(args.batch)]
    cases = [c.strip() for c in args.codecs.split(",") if c.strip()]
    previous = json.loads((ROOT / "docs" / f"{NAME}.json").read_text()) if args.merge else None
    federated, walls = (dict(previous["federated"]), dict(previous["wall_s"])) if previous else ({}, {})
    for case in cases:
        started = time.monotonic()
        federated[case] = bench_federation.simulate(args.work, case, args,
                                                    [*flags, "--deadline-s", str(args.deadline_s)])
        walls[case] = time.monotonic() - started
        print(f"{case}: perplexity " + ", ".join(f"{r['perplexity']:.2f}" for r in federated[case]), file=sys.stderr)
    central: list[dict] = previous["centralized"] if previous and args.no_central else []
    if not args.no_central:
        started = time.monotonic()
        shutil.rmtree(args.work / "central", ignore_errors=True)  # its state must start at step 0
        first = bench_federation.case_folder(args.work, cases[0])  # its split and lower-stack cache
        central = bench_federation.centralized(args.work, first, args, flags)
        walls["centralized"] = time.monotonic() - started
    from edgeftl.device.measure import platform_info
    from edgeftl.device.protocol.manifest import read_manifest

    info = platform_info()
    results = {"settings": {"devices": args.devices, "alpha": args.alpha, "rounds": args.rounds, "steps": args.steps,
                            "batch": args.batch, "lr": args.lr, "max_seq_len": args.max_seq_len,
                            "max_per_device": args.max_per_device, "max_test": 4 * args.max_per_device,
                            "trainable": read_manifest(args.bundle).trainable_count,
                            "wall_s": time.monotonic() - began + (previous["settings"]["wall_s"] if previous else 0),
                            "machine": f"{info['platform_machine']}, {info['platform_cpu_count']} CPUs"},
               "federated": federated, "centralized": central, "wall_s": walls}
    if args.no_doc:
        print(json.dumps(results, indent=1, sort_keys=True))
        print("\n".join([table(results), bytes_table(results), *verdicts(results)]))
    else:
        write_doc(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
