"""Benchmark `edgeftl build` on the packaged MiniLM: bundle size, build time and fidelity.

Six bundles: quantization {none, int8, int4} x {LoRA in every block, LoRA in the top 2
blocks (frozen lower stack split off)}, LoRA r=8 alpha=16 on the default targets, 5 BBC
labels, 128 tokens. Each build runs in a fresh process and its wall clock is the build time.

Fidelity: cosine similarity between a bundle's eval logits and the fp32 PyTorch task model's
logits on 32 BBC test articles. The reference is `prepare_model(...)` (the model the bundle
is built from) with the trainable values of that setting's fp32 bundle loaded by name, so
both sides share the head; it is computed once per train_layers setting, in its own process,
and saved. Each bundle's logits come from a process that never imports torch, as on a device.

    .venv/bin/python tools/bench_build.py            # all six, writes docs/
    .venv/bin/python tools/bench_build.py --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchdoc

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "bench_build.json"
START, END = "<!-- bench_build:start -->", "<!-- bench_build:end -->"
QUANTS = ("none", "int8", "int4")
SETTINGS = {"full": None, "top2": 2}  # name -> --train-layers
N_TEXTS, BATCH, SEED = 32, 8, 0
BUILD_FLAGS = ["--rank", "8", "--alpha", "16", "--max-seq-len", "128", "--seed", str(SEED)]
# Targets: bundle bytes as a share of the fp32 full-depth bundle; mean per-sample logit cosine.
BYTES_TARGET = {"int8": 0.35, "int4": 0.25}
COSINE_TARGET = {"int8": 0.99, "int4": 0.97}


# ---- the benchmark, top to bottom ----------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        return _WORKERS[args.worker](args)
    started = time.perf_counter()
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_build-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        texts, label_names = bbc_sample()
        (out_dir / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
        cases = _run_cases(out_dir, label_names, args)
    finally:
        if not args.out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    results = _summarise(cases, label_names, time.perf_counter() - started, args)
    section = _markdown(results)
    print(section)
    if not args.no_write:
        _write_doc(section, results["machine"])
        RAW.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)} and {RAW.relative_to(ROOT)}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="keep the bundles here (default: a temp dir, removed)")
    p.add_argument("--quick", action="store_true", help="only the full-depth fp32 / int8 / int4 bundles")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for builds, torch and ORT")
    p.add_argument("--no-write", action="store_true", help="print the table; write nothing under docs/")
    p.add_argument("--worker", choices=sorted(_WORKERS), help=argparse.SUPPRESS)  # child processes
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def bbc_sample() -> tuple[list[str], list[str]]:
    """32 test articles of a seeded stratified split, labels taken in turn (7/7/6/6/6)."""
    from edgeftl.device.data import load_bbc, stratified_split

    texts, labels, label_names = load_bbc()
    _, test = stratified_split(labels, test_fraction=0.2, seed=SEED)
    by_label = [[int(i) for i in test if labels[i] == name] for name in label_names]
    picked = [by_label[k % len(by_label)][k // len(by_label)] for k in range(N_TEXTS)]
    return [texts[i] for i in picked], label_names


def _run_cases(out_dir: Path, label_names: list[str], args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    settings = {"full": None} if args.quick else SETTINGS
    plan = [(setting, quant) for setting in settings for quant in QUANTS]  # fp32 first per setting
    cases = []
    for setting, quant in tqdm(plan, desc="bench_build", unit="bundle"):
        bundle = out_dir / f"{quant_label(quant)}-{setting}"
        case = {"setting": setting, "quant": quant, "train_layers": settings[setting]}
        case["build_time_s"] = _build(bundle, label_names, quant, settings[setting], args)
        case.update(bundle_facts(bundle))
        reference = out_dir / f"reference-{setting}.npz"
        if quant == "none":  # this setting's fp32 bundle carries the shared head
            _worker("reference", bundle, out_dir, reference, args)
        logits = out_dir / f"logits-{quant_label(quant)}-{setting}.npz"
        _worker("bundle", bundle, out_dir, logits, args)
        case.update(_fidelity(np.load(reference), np.load(logits)))
        if settings[setting] is not None:
            case.update(lower_cost(Path(__file__), bundle, out_dir / "texts.json", args.threads))
        cases.append(case)
    return cases


def _build(out: Path, labels: list[str], quant: str, train_layers: int | None, args) -> float:
    """Wall-clock seconds of one `edgeftl build` of MiniLM in a fresh process."""
    flags = ["--labels", ",".join(labels), "--quant", quant, *BUILD_FLAGS]
    return build_bundle(out, flags, train_layers, args.threads)


def build_bundle(out: Path, flags: list[str], train_layers: int | None, threads: int) -> float:
    """Wall-clock seconds of one `edgeftl build --out OUT FLAGS` in a fresh process."""
    cmd = [sys.executable, "-m", "edgeftl.device.cli", "build", "--quiet", "--force", "--out", str(out), *flags]
    if train_layers is not None:
        cmd += ["--train-layers", str(train_layers)]
    started = time.perf_counter()
    check(subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True), cmd)
    return time.perf_counter() - started


def _worker(kind: str, bundle: Path, out_dir: Path, save: Path, args) -> None:
    run_worker(Path(__file__), kind, bundle, out_dir / "texts.json", save, args.threads)


def run_worker(script: Path, kind: str, bundle: Path, texts: Path, save: Path, threads: int) -> None:
    """`script --worker KIND` on one bundle in a fresh process (the scripts' hidden worker flags)."""
    cmd = [sys.executable, str(script.resolve()), "--worker", kind, "--bundle", str(bundle),
           "--texts", str(texts), "--save", str(save), "--threads", str(threads)]
    check(subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True), cmd)


def lower_cost(script: Path, bundle: Path, texts: Path, threads: int) -> dict:
    """`lower_worker`'s numbers for a split bundle, from a fresh process."""
    save = bundle.with_name(f"lower-{bundle.name}.json")
    run_worker(script, "lower", bundle, texts, save, threads)
    return json.loads(save.read_text(encoding="utf-8"))


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def check(proc: subprocess.CompletedProcess, cmd: list[str]) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")


def quant_label(quant: str) -> str:
    return "fp32" if quant == "none" else quant


# ---- per-bundle facts (stdlib + numpy) -----------------------------------------------------

def bundle_facts(bundle: Path) -> dict:
    from edgeftl.device.protocol.manifest import read_manifest

    manifest = read_manifest(bundle)
    sizes = {p.relative_to(bundle).as_posix(): p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    return {
        "bundle_bytes": sum(sizes.values()),
        "file_bytes": sizes,
        "trainable_params": manifest.trainable_count,
        "trainable_bytes": sum(t.size * np.dtype(t.dtype).itemsize for t in manifest.trainable),
        "first_trainable_block": manifest.first_trainable_block,
        "quant_report_mean_rel_error": manifest.quantization.report.get("mean_rel_error"),
    }


def _fidelity(reference, bundle) -> dict:
    """Cosines between bundle and reference logits (32, labels), plus head identity and ids checks."""
    ref, got = reference["logits"].astype(np.float64), bundle["logits"].astype(np.float64)
    per_sample = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    names = [k for k in reference.files if k.startswith("param:")]
    head_diff = max(float(np.max(np.abs(reference[k] - bundle[k]))) for k in names)
    return {
        "cosine_mean": float(per_sample.mean()),
        "cosine_min": float(per_sample.min()),
        "cosine_flat": _cos(ref.ravel(), got.ravel()),
        "rel_l2_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        "argmax_agree": int(np.sum(ref.argmax(1) == got.argmax(1))),
        "trainable_max_abs_diff_vs_fp32": head_diff,  # 0.0: same seed, same initial head
        "same_ids": bool(np.array_equal(reference["ids"], bundle["ids"])
                         and np.array_equal(reference["mask"], bundle["mask"])),
        "bundle_process_imported_torch": bool(bundle["imported_torch"]),
    }


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- worker processes ----------------------------------------------------------------------

def _encode_all(runtime, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [runtime.encode(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)]


def _trainable_values(bundle: Path) -> dict[str, np.ndarray]:
    from edgeftl.device.params import read_params
    from edgeftl.device.protocol.manifest import PARAMS, read_manifest

    return read_params(bundle / PARAMS, {p.name for p in read_manifest(bundle).trainable})


def _save(path: Path, batches, logits: list[np.ndarray], params: dict[str, np.ndarray], **extra) -> None:
    seq = max(ids.shape[1] for ids, _ in batches)  # batches may pad to different lengths
    pad = lambda a: np.pad(a, ((0, 0), (0, seq - a.shape[1])), constant_values=-1)
    np.savez(path, logits=np.concatenate(logits), ids=np.concatenate([pad(i) for i, _ in batches]),
             mask=np.concatenate([pad(m) for _, m in batches]),
             **{f"param:{k}": v for k, v in params.items()}, **extra)


def _bundle_worker(args: argparse.Namespace) -> int:
    """Eval logits of one bundle, in a process that never imports torch."""
    from edgeftl.device.runtime import BundleRuntime

    runtime = BundleRuntime(args.bundle, threads=args.threads, train=False)
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    batches = _encode_all(runtime, texts)
    logits = []
    for ids, mask in batches:
        dummy = np.zeros(len(ids), dtype=np.int64)
        logits.append(np.asarray(runtime.eval_step(runtime.features(ids, mask), mask, dummy)[1]))
    _save(args.save, batches, logits, _trainable_values(args.bundle), imported_torch="torch" in sys.modules)
    return 0


def _reference_worker(args: argparse.Namespace) -> int:
    """fp32 PyTorch logits of the model the bundle was built from, with the bundle's initial head."""
    from edgeftl.device.protocol.manifest import read_manifest
    from edgeftl.device.runtime import BundleRuntime

    # Same tokenizer call as the bundle side.
    manifest = read_manifest(args.bundle)
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    batches = _encode_all(BundleRuntime(args.bundle, threads=args.threads, train=False), texts)
    params = _trainable_values(args.bundle)
    model, lower = _reference_model(manifest, params, args.threads)
    logits = [_torch_logits(model, lower, ids, mask) for ids, mask in batches]
    _save(args.save, batches, logits, params, imported_torch=True)
    return 0


def _reference_model(manifest, params: dict[str, np.ndarray], threads: int):
    import torch

    from edgeftl.coordinator.bundler.config import BuildConfig
    from edgeftl.coordinator.bundler.pipeline import prepare_model
    from edgeftl.models.loading import default_model_dir
    from edgeftl.models.task import LowerModel

    torch.set_num_threads(threads)
    train_layers = manifest.adapter.train_layers if manifest.split else None
    config = BuildConfig(out=Path(tempfile.gettempdir()) / "bench_build-never-written", labels=manifest.labels,
                         rank=manifest.adapter.rank, alpha=manifest.adapter.alpha, quant="none",
                         train_layers=train_layers, max_seq_len=manifest.max_seq_len, seed=SEED)
    pre, model, first = prepare_model(default_model_dir(), config)
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(params):
        raise RuntimeError(f"trainable names differ: torch-only {sorted(set(own) - set(params))}, "
                           f"bundle-only {sorted(set(params) - set(own))}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(torch.from_numpy(params[name]))
    # The split is only where the graphs are cut: the reference runs the same fp32 lower blocks.
    lower = LowerModel(pre.backbone, first).eval() if first else None
    return model.eval(), lower


def _torch_logits(model, lower, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        inputs = lower(ids_t, mask_t) if lower is not None else ids_t
        # labels and loss_weight only feed the loss; logits are output 1
        return model(inputs, mask_t, torch.zeros(len(ids), dtype=torch.int64), torch.ones(()))[1].numpy()


def lower_worker(args: argparse.Namespace) -> int:
    """The split bundle's frozen lower stack alone, as `BundleRuntime.features` runs it (torch-free).

    Saves its session's resident memory (RSS after loading minus before, and the process peak)
    and the mean wall time per example over the texts, one unpadded example at a time.
    """
    import onnxruntime as ort

    from edgeftl.device.measure import peak_rss_mib, rss_mib
    from edgeftl.device.ort import session_options
    from edgeftl.device.protocol.manifest import LOWER_MODEL, read_manifest
    from edgeftl.device.runtime import open_tokenizer

    tokenizer = open_tokenizer(args.bundle, read_manifest(args.bundle))
    ids = [e.ids for e in tokenizer.encode_batch(json.loads(args.texts.read_text(encoding="utf-8")))]
    before = rss_mib()
    session = ort.InferenceSession(str(args.bundle / LOWER_MODEL), session_options(args.threads),
                                   providers=["CPUExecutionProvider"])
    loaded = rss_mib()
    started = time.perf_counter()
    for tokens in ids:
        row = np.array([tokens], dtype=np.int64)
        session.run(None, {"input_ids": row, "attention_mask": np.ones_like(row)})
    per_example = (time.perf_counter() - started) / len(ids)
    stats = {"lower_session_rss_mib": loaded - before, "lower_peak_rss_mib": peak_rss_mib(),
             "lower_s_per_example": per_example, "lower_tokens_per_example": float(np.mean([len(t) for t in ids]))}
    args.save.write_text(json.dumps(stats), encoding="utf-8")
    return 0


_WORKERS = {"bundle": _bundle_worker, "reference": _reference_worker, "lower": lower_worker}


# ---- results, table, targets ---------------------------------------------------------------

def _summarise(cases: list[dict], label_names: list[str], wall_s: float, args) -> dict:
    base = {c["setting"]: c["bundle_bytes"] for c in cases if c["quant"] == "none"}
    for case in cases:
        case["pct_of_fp32_full"] = 100.0 * case["bundle_bytes"] / base["full"]
        if case["setting"] != "full":
            case["pct_of_fp32_same_setting"] = 100.0 * case["bundle_bytes"] / base[case["setting"]]
    return {
        "benchmark": "bench_build",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (packaged)",
        "labels": label_names,
        "build_flags": BUILD_FLAGS,
        "texts": f"{N_TEXTS} BBC test articles (stratified_split test_fraction=0.2 seed={SEED}), batches of {BATCH}",
        "threads": args.threads,
        "cases": cases,
        "targets": _targets(cases),
        "total_wall_s": wall_s,
        "machine": benchdoc.machine(),
        "source": benchdoc.git_state(),
    }


def _targets(cases: list[dict]) -> list[dict]:
    rows = []
    for case in cases:
        quant, name = case["quant"], f"{quant_label(case['quant'])} {case['setting']}"
        if quant in BYTES_TARGET and case["setting"] == "full":
            limit = 100 * BYTES_TARGET[quant]
            rows.append({"target": f"{name} bytes <= {limit:.0f}% of fp32 full", "value": case["pct_of_fp32_full"],
                         "passed": case["pct_of_fp32_full"] <= limit,
                         "margin": f"{limit - case['pct_of_fp32_full']:+.1f} points"})
        if quant in COSINE_TARGET:
            limit = COSINE_TARGET[quant]
            rows.append({"target": f"{name} mean cosine >= {limit}", "value": case["cosine_mean"],
                         "passed": case["cosine_mean"] >= limit, "margin": f"{case['cosine_mean'] - limit:+.4f}",
                         "min_cosine": case["cosine_min"]})
    return rows


def _markdown(results: dict) -> str:
    mib = 2**20
    lines = [START, "## Build: size, build time, fidelity (`tools/bench_build.py`)", "",
             f"{results['model']}, classify with {len(results['labels'])} BBC labels, LoRA r=8 alpha=16 on "
             "query/value + head, 128 tokens, seed 0. *full*: LoRA in all 6 blocks; *top2*: LoRA in the top 2 "
             "blocks, blocks 0-3 are a frozen inference-only `lower_model.onnx`. Each build ran in a fresh "
             f"process (wall clock); {results['threads']} threads. Fidelity: cosine between the bundle's eval "
             f"logits and the fp32 PyTorch model's (`prepare_model` with the same initial head) on "
             f"{results['texts']}; the bundle side ran in a process without torch.", "",
             "| bundle | MiB | % fp32 full | % fp32 same split | trainable params | trainable KiB | build s "
             "| cos mean | cos min | cos flat | argmax agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        same = f"{c['pct_of_fp32_same_setting']:.1f}%" if "pct_of_fp32_same_setting" in c else "-"
        lines.append(f"| {quant_label(c['quant'])} {c['setting']} | {c['bundle_bytes'] / mib:.1f} | "
                     f"{c['pct_of_fp32_full']:.1f}% | {same} | {c['trainable_params']:,} | "
                     f"{c['trainable_bytes'] / 1024:.1f} | {c['build_time_s']:.1f} | {c['cosine_mean']:.5f} | "
                     f"{c['cosine_min']:.5f} | {c['cosine_flat']:.5f} | {c['argmax_agree']}/{N_TEXTS} |")
    lines += ["", "Targets (cosine judged on the mean per-sample cosine; the minimum is shown beside it):", ""]
    for t in results["targets"]:
        extra = f", min {t['min_cosine']:.5f}" if "min_cosine" in t else ""
        value = f"{t['value']:.5f}" if "cosine" in t["target"] else f"{t['value']:.1f}%"
        lines.append(f"- {'PASS' if t['passed'] else 'MISS'} {t['target']}: {value} ({t['margin']}{extra})")
    src = results["source"]
    lines += ["", _checks_line(results["cases"]), "", benchdoc.machine_line(results["machine"])
              + f" Commit {src['commit']}{' + uncommitted changes' if src['dirty'] else ''}."
              + f" Whole run: {results['total_wall_s']:.0f} s. Raw numbers: `docs/bench_build.json`.", END]
    return "\n".join(lines)


def _checks_line(cases: list[dict]) -> str:
    heads = max(c["trainable_max_abs_diff_vs_fp32"] for c in cases)
    ids = all(c["same_ids"] for c in cases)
    torch_free = not any(c["bundle_process_imported_torch"] for c in cases)
    return (f"Checks: initial trainable values identical to the fp32 bundle of the same setting: "
            f"{'yes' if heads == 0 else f'NO (max abs diff {heads:.3g})'}; same token ids on both sides: "
            f"{'yes' if ids else 'NO'}; bundle processes torch-free: {'yes' if torch_free else 'NO'}.")


def _write_doc(section: str, machine: dict) -> None:
    """Replace this benchmark's marked section of docs/BENCHMARKS.md, keeping everything else."""
    benchdoc.write_section("bench_build", section, machine)


if __name__ == "__main__":
    sys.exit(main())
