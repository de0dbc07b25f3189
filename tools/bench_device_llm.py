"""Benchmark training a real small LLM on a device: memory and step time of edgeftl bundles vs PyTorch + PEFT.

The LLM half of tools/bench_device.py (whose process, quiet-machine and record helpers it uses):
SmolLM2-135M-Instruct (the packaged `smollm2`: 30 Llama blocks, hidden 576, vocabulary 49,152),
causal-LM next-token loss, LoRA r=8 alpha=16 on q_proj/v_proj of the top 2 blocks only (the
trainable set of `edgeftl build --train-layers 2`), AdamW lr 1e-3, batch 8 x 128 tokens of BBC
News articles (every row 128 tokens: articles long enough, so no padding), 2 threads everywhere.

    (a) PyTorch + PEFT eager fp32: AutoModelForCausalLM from the converted folder + peft
        LoraConfig(layers_to_transform=the top 2 blocks), model.train(), loss from `labels=`
    (e) edgeftl top-2 split int8 bundle: epoch 1 runs the frozen lower 28 blocks once per sample
        and caches their outputs (as devices do, device/cache.py), later epochs train the top 2
        blocks from the cache: both
        the first-epoch step (lower stack included) and the cached step are reported.

Every run is a fresh process; cases alternate round-robin, `--repeats` times. Peak is VmHWM of
the whole process. (e) also runs at micro-batch 2 (4 accumulated passes per optimizer step,
device/train.py `accumulate_parts`): what a device with less memory does.

    .venv/bin/python tools/bench_device_llm.py                  # 3 repeats, writes docs/
    .venv/bin/python tools/bench_device_llm.py --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_device as bd
import numpy as np

from edgeftl.device.measure import proc_status_mib
from edgeftl.device.protocol.manifest import MANIFEST

import benchdoc

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "bench_device_llm.json"
SECTION = "bench_device_llm"
MODEL, TRAIN_LAYERS, RANK, ALPHA = "smollm2", 2, 8, 16
BATCH, SEQ, EPOCH_BATCHES, WARMUP, LR, SEED = 8, 128, 3, 1, 1e-3, 0
BUNDLES = {"int8-top2": "int8"}
CASES = {"a": ("PyTorch + PEFT eager fp32", None), "e": ("edgeftl top-2 split int8", "int8-top2")}
PLAN = (("a", BATCH), ("e", BATCH), ("e", 2))
PEAK_LIMIT, STEP_LIMIT = 0.35, 1.0  # x (a): the targets for the int8 bundle


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        return {"torch": _torch_worker, "split": _split_worker}[args.worker](args)
    if args.quick:
        args.repeats = 1
    started = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_device_llm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        builds = {name: _build(work / name, quant, args) for name, quant in BUNDLES.items()}
        data = _prepare_data(work)
        runs = _run_all(work, data, args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results = _summarise(runs, builds, time.perf_counter() - started, args)
    if args.before:
        results["before"] = json.loads(args.before.read_text(encoding="utf-8"))
        results["before_note"] = args.before_note
    section = _markdown(results)
    print(section)
    if args.raw:
        args.raw.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not args.no_write:
        benchdoc.write_section(SECTION, section)
        RAW.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote docs/BENCHMARKS.md and {RAW.relative_to(ROOT)}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bd.add_common_args(p, "1 repeat")
    p.add_argument("--epochs", type=int, default=3, help=f"(e): epochs of {EPOCH_BATCHES} batches (default 3)")
    p.add_argument("--raw", type=Path, help="also write the raw results (JSON) here")
    p.add_argument("--before", type=Path, help="raw results of an earlier run (--raw) to show beside this one")
    p.add_argument("--before-note", default="", help="what changed since --before (one sentence)")
    p.add_argument("--worker", choices=("torch", "split"), help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("threads", "repeats", "epochs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.epochs < 2:
        p.error(f"--epochs must be at least 2 (epoch 1 fills the cache), got {args.epochs}")
    return args


def _build(out: Path, quant: str, args: argparse.Namespace) -> float | None:
    """Wall-clock seconds of one `edgeftl build` in a fresh process (None: reused)."""
    if args.reuse and (out / MANIFEST).is_file():
        return None
    cmd = [sys.executable, "-m", "edgeftl.device.cli", "build", "--quiet", "--force", "--model", MODEL,
           "--task", "causal-lm", "--quant", quant, "--train-layers", str(TRAIN_LAYERS), "--rank", str(RANK),
           "--alpha", str(ALPHA), "--max-seq-len", str(SEQ), "--seed", str(SEED), "--out", str(out)]
    started = time.perf_counter()
    bd._check(subprocess.run(cmd, env=bd._env(args.threads), capture_output=True, text=True), cmd)
    return round(time.perf_counter() - started, 1)


def _prepare_data(work: Path) -> Path:
    """EPOCH_BATCHES x BATCH BBC training articles of >= SEQ tokens, tokenized once (first SEQ tokens)."""
    from tokenizers import Tokenizer

    from edgeftl.device.data import load_bbc
    from edgeftl.models.packaged import resolve_model

    texts, _, _ = load_bbc()
    tok = Tokenizer.from_file(str(resolve_model(Path(MODEL), progress=False) / "tokenizer.json"))
    tok.enable_truncation(SEQ)
    order = np.random.default_rng(SEED).permutation(len(texts))
    rows = [ids for ids in (tok.encode(texts[i]).ids for i in order[:4 * EPOCH_BATCHES * BATCH]) if len(ids) == SEQ]
    ids = np.array(rows[:EPOCH_BATCHES * BATCH], dtype=np.int64)
    path = work / "data.npz"
    np.savez(path, ids=ids, mask=np.ones_like(ids))
    return path


def _run_all(work: Path, data: Path, args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    plan = [(rep, case, micro) for rep in range(args.repeats) for case, micro in PLAN]
    runs, budget = [], bd.QUIET_BUDGET_S
    with tqdm(plan, desc="bench_device_llm", unit="run") as bar:
        for rep, case, micro in bar:
            bar.set_postfix_str(f"repeat {rep + 1} ({case}) micro-batch {micro}")
            waited = bd._wait_for_quiet(min(bd.QUIET_WAIT_S, budget))
            budget -= waited
            before = bd._cpu_seconds()
            run = _spawn(case, micro, work, data, args)
            runs.append({"repeat": rep, "case": case, "micro_batch": micro, **run, "waited_for_quiet_s": waited,
                         "others_cpu_share": bd._others_share(before, bd._cpu_seconds(), run["process_wall_s"])})
            with (work / "runs.jsonl").open("a", encoding="utf-8") as log:
                log.write(json.dumps(runs[-1], sort_keys=True) + "\n")
    return runs


def _spawn(case: str, micro: int, work: Path, data: Path, args: argparse.Namespace) -> dict:
    bundle = CASES[case][1]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "torch" if bundle is None else "split",
           "--threads", str(args.threads), "--data", str(data), "--micro-batch", str(micro),
           "--epochs", str(args.epochs)]
    if bundle is not None:
        cmd += ["--bundle", str(work / bundle)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=bd._env(args.threads), capture_output=True, text=True)
    bd._check(proc, cmd)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - started}


# ---- worker processes (one case, one fresh process each) -----------------------------------

def _torch_worker(args: argparse.Namespace) -> int:
    """(a): what a user would write with transformers + PEFT, eager fp32, model.train()."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeftl.models.packaged import resolve_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    data = {k: torch.from_numpy(v) for k, v in bd._load_data(args.data).items()}
    base = AutoModelForCausalLM.from_pretrained(resolve_model(Path(MODEL), progress=False), dtype=torch.float32)
    blocks = base.config.num_hidden_layers
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        layers_to_transform=list(range(blocks - TRAIN_LAYERS, blocks)))
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()
    rss_after_load = proc_status_mib("VmRSS")

    def step(rows: slice) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(rows.start, rows.stop, args.micro_batch):
            part = slice(start, min(start + args.micro_batch, rows.stop))
            ids, mask = data["ids"][part], data["mask"][part]
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss * (len(ids) / BATCH)
            loss.backward()
            total += float(loss)
        optimizer.step()
        return total

    times, losses = [], []
    for k in range(WARMUP + EPOCH_BATCHES):
        rows = slice((k % EPOCH_BATCHES) * BATCH, (k % EPOCH_BATCHES + 1) * BATCH)
        started, cpu = time.perf_counter(), time.process_time()
        losses.append(step(rows))
        if k >= WARMUP:
            times.append((time.perf_counter() - started, time.process_time() - cpu))
    return bd._finish({"trainable_params": sum(p.numel() for p in params)}, rss_after_load, times, losses)


def _split_worker(args: argparse.Namespace) -> int:
    """(e): epoch 1 runs the lower stack per micro-batch and caches its outputs, later epochs train from the cache."""
    from edgeftl.device.runtime import BundleRuntime

    runtime = BundleRuntime(args.bundle, threads=args.threads)
    runtime.set_learning_rate(LR)
    data = bd._load_data(args.data)
    rss_after_load = proc_status_mib("VmRSS")
    ids, mask = data["ids"], data["mask"]
    cache: list[np.ndarray] = []
    first_steps, times, losses = [], [], []
    for epoch in range(args.epochs):
        for b in range(EPOCH_BATCHES):
            rows = slice(b * BATCH, (b + 1) * BATCH)
            t0, cpu = time.perf_counter(), time.process_time()
            if epoch == 0:
                cache.append(np.concatenate([runtime.features(ids[rows][i:i + args.micro_batch],
                                                              mask[rows][i:i + args.micro_batch])
                                             for i in range(0, BATCH, args.micro_batch)]))
            losses.append(bd._bundle_step(runtime, cache[b], mask[rows], ids[rows], args.micro_batch))
            took = (time.perf_counter() - t0, time.process_time() - cpu)
            (first_steps if epoch == 0 else times).append(took)
    record = {"first_epoch_step_s": statistics.median(wall for wall, _ in first_steps),
              "trainable_params": runtime.manifest.trainable_count}
    return bd._finish(record, rss_after_load, times, losses)


# ---- results, table, targets ---------------------------------------------------------------

def _summarise(runs: list[dict], builds: dict, total_s: float, args: argparse.Namespace) -> dict:
    rows = {}
    for case, micro in PLAN:
        mine = [r for r in runs if r["case"] == case and r["micro_batch"] == micro]
        row = {"case": case, "name": CASES[case][0], "micro_batch": micro, "runs": len(mine),
               "trainable_params": mine[0]["trainable_params"],
               "torch_imported": any(r["imported_torch"] for r in mine),
               "losses_finite": all(r["losses_finite"] for r in mine)}
        for key in ("rss_after_load_mib", "peak_rss_mib", "median_step_time_s", "median_step_cpu_s",
                    "first_epoch_step_s"):
            if key in mine[0]:
                row[key] = statistics.median(r[key] for r in mine)
                row[key + "_range"] = [min(r[key] for r in mine), max(r[key] for r in mine)]
        rows[f"{case}{micro}"] = row
    base = rows[f"a{BATCH}"]
    for row in rows.values():
        for key in ("peak_rss_mib", "median_step_time_s", "first_epoch_step_s"):
            if key in row:
                row[key + "_x_a"] = row[key] / base[key if key in base else "median_step_time_s"]
    return {"settings": {"model": MODEL, "batch": BATCH, "seq": SEQ, "train_layers": TRAIN_LAYERS, "rank": RANK,
                         "alpha": ALPHA, "lr": LR, "epoch_batches": EPOCH_BATCHES, "epochs": args.epochs,
                         "warmup": WARMUP, "threads": args.threads, "repeats": args.repeats},
            "cases": rows, "targets": _targets(rows), "build_s": builds, "runs": runs,
            "others_cpu_share": [min(r["others_cpu_share"] for r in runs), max(r["others_cpu_share"] for r in runs)],
            "machine": bd._machine(), "source": benchdoc.git_state(), "total_wall_s": total_s}


def _targets(rows: dict) -> list[dict]:
    out = []
    for micro in (BATCH, 2):
        row = rows[f"e{micro}"]
        for key, limit, what in (("peak_rss_mib", PEAK_LIMIT, "peak RSS"),
                                 ("median_step_time_s", STEP_LIMIT, "step, cached epochs"),
                                 ("first_epoch_step_s", STEP_LIMIT, "step, epoch 1 (lower stack included)")):
            ratio = row[key + "_x_a"]
            out.append({"target": f"(e) micro-batch {micro} {what} <= {limit:.2f}x (a)", "ratio": ratio,
                        "passed": ratio <= limit, "by": ratio - limit})
    return out


def _table(results: dict) -> list[str]:
    lines = ["| case | micro-batch | RSS after load MiB | peak RSS MiB | x (a) | step s (cached) | x (a) | step CPU s "
             "| step s (epoch 1) | x (a) | trainable | torch imported |", "|---" * 12 + "|"]
    for r in results["cases"].values():
        first = (f"{r['first_epoch_step_s']:.2f} | {r['first_epoch_step_s_x_a']:.2f}" if "first_epoch_step_s" in r
                 else "- | -")
        lines.append(f"| ({r['case']}) {r['name']} | {r['micro_batch']} | {r['rss_after_load_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib_x_a']:.2f} | {r['median_step_time_s']:.2f} | "
                     f"{r['median_step_time_s_x_a']:.2f} | {r['median_step_cpu_s']:.2f} | {first} | "
                     f"{r['trainable_params']:,} | {'yes' if r['torch_imported'] else 'no'} |")
    return lines


def _growth_line(results: dict) -> str:
    """What training adds above the loaded model: peak RSS - RSS after load, per bundle row (and before)."""
    def parts(result: dict) -> str:
        return ", ".join(f"micro-batch {r['micro_batch']}: {r['peak_rss_mib'] - r['rss_after_load_mib']:.0f} MiB"
                         for r in result["cases"].values() if r["case"] != "a")

    a = results["cases"][f"a{BATCH}"]
    text = (f"Training's own memory (peak RSS - RSS after load): (a) {a['peak_rss_mib'] - a['rss_after_load_mib']:.0f}"
            f" MiB; (e) {parts(results)}")
    if "before" in results:
        text += f"; before: (e) {parts(results['before'])}"
    return text + "."


def _quiet_line(results: dict) -> str:
    """Step times from the runs that had the machine to themselves (a shared machine slows (a) the most)."""
    def quiet(case: str, micro: int, key: str) -> float | None:
        steps = [r[key] for r in results["runs"] if r["case"] == case and r["micro_batch"] == micro
                 and r["others_cpu_share"] < bd.QUIET_SHARE and key in r]
        return statistics.median(steps) if steps else None

    a = quiet("a", BATCH, "median_step_time_s")
    if a is None:
        return f"No run of (a) had the machine to itself (other processes under {100 * bd.QUIET_SHARE:.0f}%)."
    parts = []
    for case, micro in PLAN[1:]:
        cached, first = quiet(case, micro, "median_step_time_s"), quiet(case, micro, "first_epoch_step_s")
        if cached is not None and first is not None:
            parts.append(f"({case}) micro-batch {micro}: cached {cached:.2f} s ({cached / a:.2f}x), "
                         f"epoch 1 {first:.2f} s ({first / a:.2f}x)")
    return (f"Undisturbed runs only (other processes under {100 * bd.QUIET_SHARE:.0f}% of the CPUs), median step: "
            f"(a) {a:.2f} s; " + ("; ".join(parts) or "no undisturbed bundle runs") + ". The medians above mix in "
            "runs on a busy machine, which slowed (a) more than the bundles.")


def _markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"<!-- {SECTION}:start -->", "## Device: training a real LLM, memory and step time "
             "(`tools/bench_device_llm.py`)", "",
             f"SmolLM2-135M-Instruct (packaged `smollm2`, 30 blocks, vocabulary 49,152), next-token loss, LoRA "
             f"r={s['rank']} alpha={s['alpha']} on q_proj/v_proj of the top {s['train_layers']} blocks only (same "
             f"trainable set everywhere), AdamW lr {s['lr']}, batch {s['batch']} x {s['seq']} tokens (BBC articles, "
             f"every row full length), {s['threads']} threads. Fresh process per run, cases alternating, "
             f"{s['repeats']} repeats; medians over repeats. (a) is transformers `AutoModelForCausalLM` fp32 + peft "
             "`LoraConfig(layers_to_transform=[28, 29])`, `model.train()`, loss from `labels=`; it computes the "
             "frozen lower 28 blocks every step. (e): `edgeftl build --model smollm2 --task causal-lm "
             "--train-layers 2 --quant int8`; epoch 1 runs the frozen lower stack once per sample and caches "
             f"its outputs ({s['epoch_batches']} batches per epoch), later epochs train from the cache. Peak is "
             "VmHWM of the whole process (epoch 1 included). Ratios are to (a). (a) builds the full (batch, "
             "seq, 49,152) fp32 logits, their log-softmax and gradient; the bundle's training graph computes the LM "
             "head and loss one vocabulary block at a time (16 blocks, models/adapters/head.py), recomputes each "
             "block's logits in the backward pass and dequantizes the int8 head block by block, so no "
             "(batch, seq, vocabulary) tensor exists while it trains.", "",
             *_table(results)]
    if "before" in results:
        b = results["before"]
        lines += ["", f"Before ({results.get('before_note', '')}; same settings, {b['settings']['repeats']} repeats, "
                      f"run earlier on the same machine, {b['machine']['date']}):", "",
                  *_table(b)[2:]]
    lines += ["", "Targets (int8 bundle against (a)):", ""]
    lines += [f"- {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['ratio']:.2f}x ({t['by']:+.2f}x)"
              for t in results["targets"]]
    lines += ["", _growth_line(results), "", _quiet_line(results)]
    spread = "; ".join(f"({r['case']}) mb {r['micro_batch']}: peak {r['peak_rss_mib_range'][0]:.0f}-"
                       f"{r['peak_rss_mib_range'][1]:.0f} MiB, step {r['median_step_time_s_range'][0]:.2f}-"
                       f"{r['median_step_time_s_range'][1]:.2f} s" for r in results["cases"].values())
    m, src, busy = results["machine"], results["source"], results["others_cpu_share"]
    lines += ["", f"Spread over repeats (min-max): {spread}.", "",
              f"Machine: {m['nproc']} CPUs, {m['ram_gib']} GiB RAM, {m['cpu']}, shared: other processes used "
              f"{100 * busy[0]:.0f}-{100 * busy[1]:.0f}% of its CPUs during the runs; Python {m['python']}, "
              f"onnxruntime {m.get('onnxruntime', '?')}, torch {m.get('torch', '?')}, transformers "
              f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}; {m['date']}. Commit {src['commit']}"
              f"{' + uncommitted changes' if src['dirty'] else ''}. Whole run {results['total_wall_s']:.0f} s. "
              "Raw numbers: `docs/bench_device_llm.json`.", f"<!-- {SECTION}:end -->"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
