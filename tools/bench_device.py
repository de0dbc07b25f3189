"""Benchmark training on a device: memory and step time of edgeftl bundles vs PyTorch + PEFT and vs
ONNX Runtime Training.

Same model, data, batch and thread count for every case: the packaged all-MiniLM-L6-v2,
5 BBC labels, LoRA r=8 alpha=16 on query/value + a mean-pool linear head, batch 16 x 128
tokens (BBC articles long enough that every row is 128 tokens, so all shapes are identical),
AdamW, lr 1e-3.

    (a) PyTorch + PEFT eager fp32: transformers AutoModel + peft.get_peft_model, the baseline
        a user would otherwise write (model.train(), the model's default config)
    (b) edgeftl fp32 bundle          (c) int8 bundle          (d) int4 bundle
    (e) top-2 split int8 bundle: the frozen lower stack runs once per sample in epoch 1, its
        outputs are cached, later epochs only train the top 2 blocks
    (b*)-(e*) the same bundles as devices trained them before they moved to stock onnxruntime:
        ONNX Runtime Training 1.19.2's own artifacts for each bundle (`edgeftl build
        --reference-dir`: training-only ops, in-graph gradient accumulators, AdamW graph,
        checkpoint) on its Module/Optimizer API, with the bundle's tokenizer and lower stack, in a
        process whose onnxruntime is the training build. (b)-(e) run the portable bundles on the
        stock onnxruntime of this venv, AdamW in numpy.

Every case runs in a fresh process; the cases alternate round-robin, `--repeats` times. A run
does WARMUP steps, then `--steps` timed steps ((e): whole epochs of EPOCH_BATCHES batches).
Bundle processes import only edgeftl.device + numpy and report whether torch got loaded.
The portable runtime's targets: peak RSS and median step each <= 1.05 x its (x*) twin.
Memory is read from /proc/self/status: VmRSS once the model and optimizer exist (before the
first step) and VmHWM (peak RSS) at the end. Each figure is the median over repeats.

The edgeftl cases run twice: micro-batch 16 (one pass per step) and micro-batch 4 (four
passes, gradients weighted and accumulated exactly as device/train.py `accumulate_parts`,
one optimizer step per batch of 16). PyTorch runs the same way for reference.

    .venv/bin/python tools/bench_device.py              # 3 repeats, writes docs/
    .venv/bin/python tools/bench_device.py --quick --no-write
    .venv/bin/python tools/bench_device.py --arm64      # also (c) and (e) on an emulated ARM64 board

With --arm64 (root, Debian host), (c) and (e) also run under qemu-user on the Debian 12 ARM64
board the tests use (tools/emulated_root.py), batch 2 x 128, 2 steps: a step time to know, not
a target (the same steps natively take 0.08 s (int8) and 0.06 s (split): ~110-210x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeftl.device.measure import proc_status_mib, usable_cpus  # VmRSS / VmHWM in MiB, as devices report them
from edgeftl.device.protocol.manifest import MANIFEST

import benchdoc

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "bench_device.json"
START, END = "<!-- bench_device:start -->", "<!-- bench_device:end -->"
BATCH, SEQ, EPOCH_BATCHES, WARMUP, LR, SEED = 16, 128, 8, 2, 1e-3, 0
BUILD_FLAGS = ["--rank", "8", "--alpha", "16", "--max-seq-len", str(SEQ), "--seed", str(SEED)]
BUNDLES = {"fp32": ["--quant", "none"], "int8": ["--quant", "int8"], "int4": ["--quant", "int4"],
           "int8-top2": ["--quant", "int8", "--train-layers", "2"]}
CASES = {"a": ("PyTorch + PEFT eager fp32", None), "b": ("edgeftl fp32 bundle", "fp32"),
         "c": ("edgeftl int8 bundle", "int8"), "d": ("edgeftl int4 bundle", "int4"),
         "e": ("edgeftl top-2 split int8, cached lower outputs", "int8-top2"),
         "b*": ("ORT Training build, fp32", "fp32"), "c*": ("ORT Training build, int8", "int8"),
         "d*": ("ORT Training build, int4", "int4"), "e*": ("ORT Training build, top-2 split int8", "int8-top2")}
TRAINING_BUILD = "*"  # case suffix: the bundle's ORT Training artifacts on the training build
MICRO_BATCHES = (16, 4)
# The machine may be shared: before each run, wait until other processes use under QUIET_SHARE
# of the CPUs (sampled over QUIET_SAMPLE_S), at most QUIET_WAIT_S per run and QUIET_BUDGET_S in all.
QUIET_SHARE, QUIET_SAMPLE_S, QUIET_WAIT_S, QUIET_BUDGET_S = 0.10, 2.0, 60.0, 600.0


# ---- the benchmark, top to bottom ----------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        return _WORKERS[args.worker](args)
    if args.quick:
        args.repeats, args.steps = 1, 3
    started = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_device-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        labels = _label_names()
        builds = {name: _build(work / name, labels, flags, args) for name, flags in BUNDLES.items()}
        for name in BUNDLES:
            _legacy_lower(work / name)
        data = _prepare_data(work, work / "fp32" / "tokenizer.json", labels)
        runs = _run_all(work, data, args)
        runtime_alone = _runtime_alone(work, data, args)
        emulated = _arm64_emulated(work, data, args) if args.arm64 else None
        checkpoints = {name: (work / name / "params.safetensors").stat().st_size / 2**20 for name in BUNDLES}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results = _summarise(runs, builds, labels, time.perf_counter() - started, args)
    results["runtime_alone_rss_mib"] = {runtime: {"runs": runs_, "median": statistics.median(runs_)}
                                        for runtime, runs_ in runtime_alone.items()}
    results["checkpoint_mib"] = checkpoints
    results["step_gflop"] = _step_gflop()
    if emulated is not None:
        results["arm64_emulated"] = emulated
    section = _markdown(results)
    print(section)
    if not args.no_write:
        _write_doc(section)
        RAW.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)} and {RAW.relative_to(ROOT)}")
    return 0


def add_common_args(p: argparse.ArgumentParser, quick_help: str) -> None:
    """Flags both device benchmarks (this one and bench_device_llm.py) take."""
    p.add_argument("--threads", type=int, default=2, help="torch threads / ORT intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="round-robin passes over all cases (default 3)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--work-dir", default=None, help="bundles and data here (default: a temp dir, removed)")
    p.add_argument("--reuse", action="store_true", help="keep bundles already in --work-dir")
    p.add_argument("--no-write", action="store_true", help="print the table; write nothing under docs/")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "1 repeat, 3 steps")
    p.add_argument("--steps", type=int, default=6, help=f"timed steps per run after {WARMUP} warmup (default 6)")
    p.add_argument("--arm64", action="store_true", help="also time (c) and (e) on an emulated ARM64 board (root)")
    p.add_argument("--worker", choices=sorted(_WORKERS), help=argparse.SUPPRESS)  # child processes
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--runtime", choices=("stock", "training"), default="stock", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("threads", "repeats", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    return args


def _label_names() -> list[str]:
    from edgeftl.device.data import bbc_root

    return sorted(p.name for p in bbc_root().iterdir() if p.is_dir() and not p.name.startswith("_"))


def _build(out: Path, labels: list[str], flags: list[str], args) -> float | None:
    """Wall-clock seconds of one `edgeftl build` in a fresh process (None: reused)."""
    if args.reuse and (out / MANIFEST).is_file():
        return None
    cmd = [sys.executable, "-m", "edgeftl.device.cli", "build", "--quiet", "--force",
           "--labels", ",".join(labels), "--out", str(out), "--reference-dir", str(_reference(out)), *flags,
           *BUILD_FLAGS]
    started = time.perf_counter()
    _check(subprocess.run(cmd, env=_env(args.threads), capture_output=True, text=True), cmd)
    return round(time.perf_counter() - started, 1)


def _prepare_data(work: Path, tokenizer: Path, labels: list[str]) -> Path:
    """EPOCH_BATCHES x BATCH training articles of >= SEQ tokens, labels in turn, tokenized once.

    Tokenized here with the bundle's own tokenizer.json (what BundleRuntime.encode uses) so
    every process gets the same (ids, mask, labels) arrays; workers time steps, not tokenizing.
    """
    from tokenizers import Tokenizer

    from edgeftl.device.data import load_bbc, stratified_split

    texts, text_labels, names = load_bbc()
    assert names == labels, (names, labels)
    tok = Tokenizer.from_file(str(tokenizer))
    tok.enable_truncation(SEQ)
    tok.no_padding()
    train, _ = stratified_split(text_labels, test_fraction=0.2, seed=SEED)
    order = np.random.default_rng(SEED).permutation(train)
    pools = {name: [int(i) for i in order if text_labels[i] == name] for name in labels}
    picked: list[int] = []
    for k in range(EPOCH_BATCHES * BATCH):  # 26/26/26/25/25 articles, labels in turn
        pool = pools[labels[k % len(labels)]]
        while len(tok.encode(texts[pool[0]]).ids) < SEQ:
            pool.pop(0)  # too short: its row would be padded
        picked.append(pool.pop(0))
    ids = np.array([tok.encode(texts[i]).ids for i in picked], dtype=np.int64)  # (n, SEQ)
    path = work / "data.npz"
    np.savez(path, ids=ids, mask=np.ones_like(ids), labels=np.array([labels.index(text_labels[i]) for i in picked]))
    # The raw texts (8 MiB as a numpy unicode array) are read only after the memory readings.
    path.with_suffix(".texts.json").write_text(json.dumps([texts[i] for i in picked]), encoding="utf-8")
    return path


def _plan() -> list[tuple[str, int]]:
    """One round-robin pass: every case at micro-batch 16, then every case at micro-batch 4.

    Each bundle case runs right before its training-build twin, so the two see the same machine:
    step times here drift by up to 25% over minutes with nothing else running in this VM.
    """
    order = sorted(CASES, key=lambda case: (case.rstrip(TRAINING_BUILD), case.endswith(TRAINING_BUILD)))
    return [(case, micro) for micro in MICRO_BATCHES for case in order]


def _run_all(work: Path, data: Path, args) -> list[dict]:
    from tqdm import tqdm

    plan = [(rep, case, micro) for rep in range(args.repeats) for case, micro in _plan()]
    runs, budget = [], QUIET_BUDGET_S
    with tqdm(plan, desc="bench_device", unit="run") as bar:
        for rep, case, micro in bar:
            bar.set_postfix_str(f"repeat {rep + 1} ({case}) micro-batch {micro}")
            waited = _wait_for_quiet(min(QUIET_WAIT_S, budget))
            budget -= waited
            load_before, busy_before = os.getloadavg()[0], _cpu_seconds()
            run = _worker(case, micro, work, data, args)
            runs.append({"repeat": rep, "case": case, "micro_batch": micro, **run, "waited_for_quiet_s": waited,
                         "loadavg_1min": [load_before, os.getloadavg()[0]],
                         "others_cpu_share": _others_share(busy_before, _cpu_seconds(), run["process_wall_s"])})
            with (work / "runs.jsonl").open("a", encoding="utf-8") as log:  # survives an interrupted run
                log.write(json.dumps(runs[-1], sort_keys=True) + "\n")
    return runs


def _runtime_alone(work: Path, data: Path, args) -> dict[str, list[float]]:
    """RSS of a device process that loads everything but a model, once per repeat (MiB), per runtime."""
    flags = ["--data", str(data), "--bundle", str(work / "fp32")]
    return {runtime: [_spawn("runtime", [*flags, "--runtime", runtime], args.threads,
                             training=runtime == "training")["rss_after_load_mib"] for _ in range(args.repeats)]
            for runtime in ("stock", "training")}


ARM64_BATCH, ARM64_STEPS = 2, 2


def _arm64_emulated(work: Path, data: Path, args) -> list[dict]:
    """(c) and (e) on the emulated Debian 12 ARM64 board, in fresh processes there (not a target)."""
    import emulated_root

    made = emulated_root.board("bookworm", "arm64", emulated_root.device_requirements())
    guest, env = emulated_root.with_edgeftl(made, emulated_root.edgeftl_wheel(work / "wheel"), "bench_device")
    for path in (Path(__file__), Path(__file__).with_name("benchdoc.py"), data):
        shutil.copyfile(path, made.host_path(f"{guest}/{path.name}"))
    out = []
    for case in ("c", "e"):
        bundle = CASES[case][1]
        shutil.copytree(work / bundle, made.host_path(f"{guest}/{bundle}"), dirs_exist_ok=True)
        argv = [made.python, f"{guest}/{Path(__file__).name}", "--worker", "emulated", "--threads", str(args.threads),
                "--bundle", f"{guest}/{bundle}", "--data", f"{guest}/{data.name}", "--steps", str(ARM64_STEPS)]
        proc = subprocess.run(made.command(argv, env), capture_output=True, text=True)
        _check(proc, argv)
        out.append({"case": case, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return out


def _reference(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".reference")


def _legacy_lower(bundle: Path) -> None:
    """Give a split int8 bundle's training-build twin the lower stack devices ran on that build
    (quantize_dynamic): ONNX Runtime Training 1.19.2's MatMulNBits runs only 4 bits, not the 8-bit
    lower stack bundles carry now, so the twin could not load the bundle's own."""
    from edgeftl.device.protocol.manifest import LOWER_MODEL, read_manifest
    from edgeftl.quantization.ort_int import int8_lower_as_before

    lower, legacy = bundle / LOWER_MODEL, _reference(bundle) / LOWER_MODEL
    if read_manifest(bundle).split and lower.is_file() and not legacy.is_file():
        partial = legacy.with_name(legacy.name + ".partial")
        if int8_lower_as_before(lower, partial):
            partial.replace(legacy)
        else:  # an int4 (or fp32) lower stack: the training build runs the bundle's own
            partial.unlink(missing_ok=True)


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this script's finished children)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait, in clock ticks
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def _others_share(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """Share of the machine's CPUs that other processes used while one run was going on.

    The machine may be shared: runs with a large share have inflated step times.
    """
    others = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(0.0, others) / (wall_s * usable_cpus()), 3)


def _wait_for_quiet(limit_s: float) -> float:
    """Seconds spent waiting (at most about limit_s) for other processes to leave the CPUs idle."""
    started = time.perf_counter()
    while True:
        before = _cpu_seconds()
        time.sleep(QUIET_SAMPLE_S)
        waited = time.perf_counter() - started
        if _others_share(before, _cpu_seconds(), QUIET_SAMPLE_S) < QUIET_SHARE or waited >= limit_s:
            return round(waited, 1)


def _worker(case: str, micro: int, work: Path, data: Path, args) -> dict:
    bundle = CASES[case][1]
    kind = "torch" if bundle is None else ("split" if bundle == "int8-top2" else "bundle")
    training = case.endswith(TRAINING_BUILD)
    flags = ["--data", str(data), "--steps", str(args.steps), "--micro-batch", str(micro),
             "--epochs", "2" if args.quick else "3", "--runtime", "training" if training else "stock"]
    if bundle is not None:
        flags += ["--bundle", str(work / bundle)]
    return _spawn(kind, flags, args.threads, training)


def _spawn(kind: str, flags: list[str], threads: int, training: bool = False) -> dict:
    """Run one worker of this script in a fresh process: its last stdout line (JSON) + process_wall_s.

    `training`: in a process whose onnxruntime is the training build (training_build.job_env).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(threads), *flags]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(threads, training), capture_output=True, text=True)
    _check(proc, cmd)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - started}


def _env(threads: int, training: bool = False) -> dict[str, str]:
    from edgeftl.coordinator.bundler.training_build import job_env

    env = job_env() if training else dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _check(proc: subprocess.CompletedProcess, cmd: list[str]) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")


# ---- worker processes (one case, one fresh process each) -----------------------------------

def _load_data(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _finish(result: dict, rss_after_load: float, times: list[tuple[float, float]], losses: list[float]) -> int:
    """Print the run's flat record (units in key names) as the last stdout line.

    `times` holds (wall, cpu) seconds per timed step; CPU time (all threads of this process)
    is less disturbed than wall time when other work shares the machine.
    """
    result.update(
        rss_after_load_mib=rss_after_load,
        peak_rss_mib=proc_status_mib("VmHWM"),
        ru_maxrss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        median_step_time_s=statistics.median(wall for wall, _ in times),
        median_step_cpu_s=statistics.median(cpu for _, cpu in times),
        step_times_s=[round(wall, 4) for wall, _ in times],
        first_loss=losses[0], last_loss=losses[-1], losses_finite=bool(np.isfinite(losses).all()),
        imported_torch="torch" in sys.modules, imported_transformers="transformers" in sys.modules,
    )
    print(json.dumps(result))
    return 0


def _torch_worker(args: argparse.Namespace) -> int:
    """(a): what a user would write with transformers + PEFT, eager fp32, model.train()."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from torch.nn import functional as F
    from transformers import AutoModel

    from edgeftl.models.loading import default_model_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    data = {k: torch.from_numpy(v) for k, v in _load_data(args.data).items()}
    backbone = AutoModel.from_pretrained(default_model_dir())
    model = get_peft_model(backbone, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    head = nn.Linear(backbone.config.hidden_size, int(data["labels"].max()) + 1)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()
    rss_after_load = proc_status_mib("VmRSS")

    def step(rows: slice) -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(rows.start, rows.stop, args.micro_batch):
            part = slice(start, min(start + args.micro_batch, rows.stop))
            ids, mask, labels = data["ids"][part], data["mask"][part], data["labels"][part]
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (batch, seq, hidden)
            keep = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # masked mean pooling
            weight = len(labels) / (rows.stop - rows.start)
            loss = F.cross_entropy(head(pooled), labels) * weight
            loss.backward()
            total += float(loss)
        optimizer.step()
        return total

    times, losses = _timed_steps(step, args.steps)
    return _finish({"trainable_params": sum(p.numel() for p in params)}, rss_after_load, times, losses)


def _timed_steps(step, steps: int) -> tuple[list[tuple[float, float]], list[float]]:
    """WARMUP untimed steps, then `steps` timed ones; batch k is rows [16k, 16k+16) of the epoch."""
    times, losses = [], []
    for k in range(WARMUP + steps):
        first = (k % EPOCH_BATCHES) * BATCH
        started, cpu = time.perf_counter(), time.process_time()
        losses.append(step(slice(first, first + BATCH)))
        if k >= WARMUP:
            times.append((time.perf_counter() - started, time.process_time() - cpu))
    return times, losses


def _bundle_step(runtime, feats: np.ndarray, mask: np.ndarray, labels: np.ndarray, micro: int) -> float:
    """One optimizer step over a batch run as micro-batches whose gradients add up exactly
    (device/train.py `accumulate_parts`, as devices train)."""
    from edgeftl.device.train import accumulate_parts  # after _open_bundle: the training build loads first

    parts = [(feats[i:i + micro], mask[i:i + micro], labels[i:i + micro]) for i in range(0, len(labels), micro)]
    loss = accumulate_parts(runtime, parts, 1.0)
    runtime.apply_step()
    return loss


def _open_bundle(args: argparse.Namespace):
    if args.runtime == "training":
        runtime = _TrainingBuild(args.bundle, args.threads)
    else:
        from edgeftl.device.runtime import BundleRuntime

        runtime = BundleRuntime(args.bundle, threads=args.threads)
    data = _load_data(args.data)
    runtime.set_learning_rate(LR)
    return runtime, data, proc_status_mib("VmRSS")


class _TrainingBuild:
    """A bundle as devices trained it on ONNX Runtime Training: its reference artifacts on the
    Module/Optimizer API, with the bundle's tokenizer and lower stack (loaded the way the device
    runtime loads them), all sessions drawing from one shared arena with ORT's default settings,
    as the device runtime did (the portable runtime's arena settings raised the training
    build's peaks by 2-21 MiB at 16 x 128)."""

    def __init__(self, bundle: Path, threads: int) -> None:
        from edgeftl.coordinator.bundler.reference import ReferenceRuntime, training_api

        training_api()  # before onnxruntime is imported: no torch
        import onnxruntime as ort

        from edgeftl.device import ort as device_ort
        from edgeftl.device.ort import session_options
        from edgeftl.device.protocol.manifest import LOWER_MODEL, read_manifest
        from edgeftl.device.runtime import open_tokenizer

        device_ort.ARENA = {}  # ORT's default arena settings, as devices ran the training build

        self.manifest = read_manifest(bundle)
        self.reference = ReferenceRuntime(_reference(bundle), threads, shared_arena=True)
        lower = _reference(bundle) / LOWER_MODEL  # the lower stack as before (see _legacy_lower)
        self.lower = (ort.InferenceSession(str(lower if lower.is_file() else bundle / LOWER_MODEL),
                                           session_options(threads, shared_arena=True),
                                           providers=["CPUExecutionProvider"]) if self.manifest.split else None)
        self.tokenizer = open_tokenizer(bundle, self.manifest)
        self.set_learning_rate, self.accumulate = self.reference.set_learning_rate, self.reference.accumulate
        self.apply_step = self.reference.apply_step

    def features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from edgeftl.device.runtime import BundleRuntime

        return BundleRuntime.features(self, ids, mask)  # the same per-example lower-stack calls

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from edgeftl.device.runtime import BundleRuntime

        return BundleRuntime.encode(self, texts)


def _encode_matches(runtime, data: dict[str, np.ndarray], args: argparse.Namespace) -> bool:
    """The device's own tokenization gives the benchmark's ids (checked after the load reading)."""
    texts = json.loads(args.data.with_suffix(".texts.json").read_text(encoding="utf-8"))
    ids, mask = runtime.encode(texts[:BATCH])
    return bool(np.array_equal(ids, data["ids"][:BATCH]) and np.array_equal(mask, data["mask"][:BATCH]))


def _bundle_worker(args: argparse.Namespace) -> int:
    """(b)-(d): full-depth bundles; token ids go straight into the training graph."""
    runtime, data, rss_after_load = _open_bundle(args)
    ids, mask, labels = data["ids"], data["mask"], data["labels"]

    def step(rows: slice) -> float:
        return _bundle_step(runtime, runtime.features(ids[rows], mask[rows]), mask[rows], labels[rows],
                            args.micro_batch)

    times, losses = _timed_steps(step, args.steps)
    record = {"encode_matches": _encode_matches(runtime, data, args),
              "trainable_params": runtime.manifest.trainable_count}
    return _finish(record, rss_after_load, times, losses)


def _split_worker(args: argparse.Namespace) -> int:
    """(e): epoch 1 runs the frozen lower stack once per sample and caches its outputs
    (in memory; 128 x 128 x 384 float32 = 24 MiB); later epochs only train the top blocks."""
    runtime, data, rss_after_load = _open_bundle(args)
    ids, mask, labels = data["ids"], data["mask"], data["labels"]
    cache: list[np.ndarray] = []
    epoch_s, lower_s, times, losses = [], 0.0, [], []
    for epoch in range(args.epochs):
        started = time.perf_counter()
        for b in range(EPOCH_BATCHES):
            rows = slice(b * BATCH, (b + 1) * BATCH)
            if epoch == 0:  # lower forward in micro-batches too: peak memory follows micro_batch
                t0 = time.perf_counter()
                cache.append(np.concatenate([runtime.features(ids[rows][i:i + args.micro_batch],
                                                              mask[rows][i:i + args.micro_batch])
                                             for i in range(0, BATCH, args.micro_batch)]))
                lower_s += time.perf_counter() - t0
            t0, cpu = time.perf_counter(), time.process_time()
            losses.append(_bundle_step(runtime, cache[b], mask[rows], labels[rows], args.micro_batch))
            if epoch > 0:
                times.append((time.perf_counter() - t0, time.process_time() - cpu))
        epoch_s.append(time.perf_counter() - started)
    record = {"epoch_times_s": [round(t, 4) for t in epoch_s], "epoch1_lower_forward_s": round(lower_s, 4),
              "epoch1_time_s": epoch_s[0], "epoch2_time_s": epoch_s[1],
              "encode_matches": _encode_matches(runtime, data, args),
              "trainable_params": runtime.manifest.trainable_count}
    return _finish(record, rss_after_load, times, losses)


def _runtime_worker(args: argparse.Namespace) -> int:
    """What a device process holds before any model: Python, numpy, ONNX Runtime (stock, or the
    training build with its training API), the tokenizer and the benchmark data; the part of "RSS
    after load" no quantization can shrink."""
    from tokenizers import Tokenizer

    if args.runtime == "training":
        from edgeftl.coordinator.bundler.reference import training_api

        training_api()
    else:
        import onnxruntime  # noqa: F401
    _load_data(args.data)
    Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    print(json.dumps({"rss_after_load_mib": proc_status_mib("VmRSS")}))
    return 0


def _emulated_worker(args: argparse.Namespace) -> int:
    """On the emulated board: ARM64_BATCH rows, `--steps` optimizer steps, each timed whole (lower stack
    included for a split bundle)."""
    import platform

    import onnxruntime

    runtime, data, rss_after_load = _open_bundle(args)
    rows = slice(0, ARM64_BATCH)
    ids, mask, labels = data["ids"][rows], data["mask"][rows], data["labels"][rows]
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        _bundle_step(runtime, runtime.features(ids, mask), mask, labels, ARM64_BATCH)
        times.append(round(time.perf_counter() - started, 2))
    print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                      "onnxruntime": onnxruntime.__version__, "batch": ARM64_BATCH, "seq": int(ids.shape[1]),
                      "step_times_s": times, "rss_after_load_mib": rss_after_load,
                      "peak_rss_mib": proc_status_mib("VmHWM")}))
    return 0


_WORKERS = {"torch": _torch_worker, "bundle": _bundle_worker, "split": _split_worker, "runtime": _runtime_worker,
            "emulated": _emulated_worker}


# ---- results, table, targets ---------------------------------------------------------------

METRICS = ("rss_after_load_mib", "peak_rss_mib", "median_step_time_s", "median_step_cpu_s", "epoch1_time_s",
           "epoch2_time_s", "epoch1_lower_forward_s")


def _summarise(runs: list[dict], builds: dict, labels: list[str], wall_s: float, args) -> dict:
    rows = {}
    for case, micro in _plan():
        mine = [r for r in runs if r["case"] == case and r["micro_batch"] == micro]
        row = {"case": case, "name": CASES[case][0], "micro_batch": micro, "runs": len(mine),
               "imported_torch_any": any(r["imported_torch"] for r in mine),
               "losses_finite": all(r["losses_finite"] for r in mine),
               "encode_matches": all(r.get("encode_matches", True) for r in mine),
               "others_cpu_shares": [r["others_cpu_share"] for r in mine]}
        quiet = [r["median_step_time_s"] for r in mine if r["others_cpu_share"] < QUIET_SHARE]
        row["quiet_runs"], row["quiet_median_step_time_s"] = len(quiet), statistics.median(quiet) if quiet else None
        for key in METRICS:
            values = [r[key] for r in mine if key in r]
            if values:
                row[key] = statistics.median(values)
                row[key.rsplit("_", 1)[0] + "_range"] = [min(values), max(values)]
        # A full-depth epoch is EPOCH_BATCHES steps; (e) reports its measured epochs instead.
        row.setdefault("epoch_time_s", row.get("epoch2_time_s", EPOCH_BATCHES * row["median_step_time_s"]))
        rows[f"{case}{micro}"] = row
    base = rows[f"a{BATCH}"]
    for row in rows.values():
        for key in ("rss_after_load_mib", "peak_rss_mib", "median_step_time_s", "median_step_cpu_s"):
            row[key.rsplit("_", 1)[0] + "_x_a"] = row[key] / base[key]
    return {
        "benchmark": "bench_device",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (packaged)",
        "labels": labels, "build_flags": BUILD_FLAGS, "bundles": {k: " ".join(v) for k, v in BUNDLES.items()},
        "build_time_s": builds,
        "settings": {"batch": BATCH, "seq": SEQ, "threads": args.threads, "repeats": args.repeats,
                     "warmup_steps": WARMUP, "timed_steps": args.steps, "epoch_batches": EPOCH_BATCHES,
                     "lr": LR, "split_epochs": 2 if args.quick else 3, "micro_batches": list(MICRO_BATCHES)},
        "cases": rows,
        "targets": {f"micro-batch {m}": _targets(rows, m) for m in MICRO_BATCHES},
        "portable_targets": {f"micro-batch {m}": _portable_targets(rows, runs, m) for m in MICRO_BATCHES},
        "runs": runs,
        "loadavg_1min_during_runs": _spread([x for r in runs for x in r["loadavg_1min"]]),
        "others_cpu_share_during_runs": _spread([r["others_cpu_share"] for r in runs]),
        "total_wall_s": wall_s,
        "machine": _machine(),
        "source": benchdoc.git_state(),
    }


def _spread(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


def _targets(rows: dict, micro: int) -> list[dict]:
    """The issue's targets for the edgeftl cases at `micro`, always against (a) at batch 16."""
    a, b, c, d, e = (rows[f"a{BATCH}"], *(rows[f"{k}{micro}"] for k in "bcde"))

    def ratio(name: str, value: float, base: float, limit: float, unit: str, strict: bool = False) -> dict:
        r = value / base
        passed = r < limit if strict else r <= limit
        digits = 2 if unit == "s" else 0
        return {"target": name, "ratio": r, "limit": limit, "passed": passed,
                "margin": f"{r:.3f}x vs limit {limit:.2f}x ({limit - r:+.3f}x; "
                          f"{value:.{digits}f} {unit} vs {base * limit:.{digits}f} {unit})"}

    p = "peak_rss_mib"
    return [
        ratio("(c) int8 peak RSS <= 0.4 x (a)", c[p], a[p], 0.4, "MiB"),
        ratio("(c) int8 peak RSS < (b) fp32 peak RSS", c[p], b[p], 1.0, "MiB", strict=True),
        ratio("(d) int4 peak RSS < (b) fp32 peak RSS", d[p], b[p], 1.0, "MiB", strict=True),
        ratio("(c) RSS after load <= 0.5 x (b)", c["rss_after_load_mib"], b["rss_after_load_mib"], 0.5, "MiB"),
        ratio("(b) median step <= 1.0 x (a)", b["median_step_time_s"], a["median_step_time_s"], 1.0, "s"),
        ratio("(e) peak RSS <= 0.25 x (a)", e[p], a[p], 0.25, "MiB"),
        ratio("(e) epoch-2 time <= 0.2 x (b) epoch time", e["epoch2_time_s"], b["epoch_time_s"], 0.2, "s"),
    ]


def _portable_targets(rows: dict, runs: list[dict], micro: int) -> list[dict]:
    """Stock onnxruntime + numpy AdamW against the training build, bundle by bundle: each <= 1.05x.

    The ratio is the median over repeats of each run over its twin run right after it (paired, so
    drift of the machine between repeats cancels); the medians of each side are shown beside it.
    """
    out = []
    for case in "bcde":
        twin = f"{case}{TRAINING_BUILD}"
        mine, theirs = rows[f"{case}{micro}"], rows[f"{twin}{micro}"]
        pairs = {(r["repeat"], r["case"]): r for r in runs if r["micro_batch"] == micro and r["case"] in (case, twin)}
        for key, unit, what in (("peak_rss_mib", "MiB", "peak RSS"), ("median_step_time_s", "s", "median step")):
            ratios = [pairs[(k, case)][key] / pairs[(k, twin)][key]
                      for k, c in pairs if c == case and (k, twin) in pairs]
            r = statistics.median(ratios)
            digits = 2 if unit == "s" else 0
            out.append({"target": f"({case}) {what} <= 1.05 x ({twin})", "ratio": r, "limit": 1.05, "passed": r <= 1.05,
                        "paired_ratios": ratios,
                        "margin": f"{r:.3f}x vs limit 1.05x ({1.05 - r:+.3f}x; paired per repeat: "
                                  f"{', '.join(f'{x:.2f}' for x in ratios)}; medians {mine[key]:.{digits}f} vs "
                                  f"{theirs[key]:.{digits}f} {unit})"})
    return out


def _markdown(results: dict) -> str:
    s = results["settings"]
    lines = [START, "## Device: training memory and step time (`tools/bench_device.py`)", "",
             f"{results['model']}, classify with {len(results['labels'])} BBC labels, LoRA r=8 alpha=16 on "
             f"query/value + mean-pool linear head, AdamW lr {s['lr']}; batch {s['batch']} x {s['seq']} tokens "
             f"({s['epoch_batches'] * s['batch']} BBC training articles of at least {s['seq']} tokens, so every "
             f"row is {s['seq']} tokens, tokenized once); {s['threads']} threads everywhere (torch.set_num_threads, "
             "ORT intra_op_num_threads, OMP/MKL). Each run is a fresh process, started once other processes "
             f"use under {100 * QUIET_SHARE:.0f}% of the CPUs (waiting at most {QUIET_WAIT_S:.0f} s per run, "
             f"{QUIET_BUDGET_S / 60:.0f} min in all; the share they used during each run is recorded); the "
             f"{len(CASES) * len(MICRO_BATCHES)} cases alternate round-robin, {s['repeats']} repeats; "
             f"a run does {s['warmup_steps']} warmup + "
             f"{s['timed_steps']} timed optimizer steps. Figures are medians over repeats of: VmRSS once model + "
             "optimizer exist (before the first step), VmHWM (peak RSS) at the end, and the run's median step "
             "time, wall clock and process CPU time (all threads; less disturbed by other work on a shared "
             "machine, but it "
             "counts spin-waiting). The targets use wall clock. "
             "(a) is transformers `AutoModel` + `peft.get_peft_model` in eager fp32 with `model.train()` "
             "(the model's default dropout 0.1 on; the bundles' graphs have no dropout). (b)-(d): "
             f"`edgeftl build --quant none|int8|int4`; (e): `--quant int8 --train-layers 2`: epoch 1 runs the "
             f"frozen lower 4 blocks once per sample and caches their outputs in memory, later epochs "
             f"({s['epoch_batches']} batches each) train only the top 2 blocks; its step time is from the "
             f"cached epochs. A full-depth epoch time is {s['epoch_batches']} x the median step. "
             "(b*)-(e*): the same bundles' ONNX Runtime Training artifacts (`edgeftl build --reference-dir`) on "
             "the training build's Module/Optimizer, with the bundle's tokenizer and lower stack, as devices ran "
             "them before moving to stock onnxruntime; (b)-(e) run on stock onnxruntime with AdamW in numpy. "
             "*micro-batch 4*: each batch of 16 runs as 4 forward/backward passes whose weighted gradients "
             "add up exactly to the batch's, then one optimizer step (device/train.py `accumulate_parts`; "
             "PyTorch the same way with loss scaling). All ratios are to (a) at micro-batch 16.", "",
             "| case | micro-batch | RSS after load MiB | x (a) | peak RSS MiB | x (a) | median step s | x (a) "
             "| step CPU s | x (a) | epoch s | torch imported |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["cases"].values():
        epoch = (f"{row['epoch1_time_s']:.2f} first, {row['epoch2_time_s']:.2f} cached" if "epoch2_time_s" in row
                 else f"{row['epoch_time_s']:.2f}")
        lines.append(f"| ({row['case']}) {row['name']} | {row['micro_batch']} | {row['rss_after_load_mib']:.0f} | "
                     f"{row['rss_after_load_x_a']:.2f} | {row['peak_rss_mib']:.0f} | {row['peak_rss_x_a']:.2f} | "
                     f"{row['median_step_time_s']:.3f} | {row['median_step_time_x_a']:.2f} | "
                     f"{row['median_step_cpu_s']:.3f} | {row['median_step_cpu_x_a']:.2f} | {epoch} | "
                     f"{'yes' if row['imported_torch_any'] else 'no'} |")
    for config, targets in results.get("portable_targets", {}).items():
        passed = sum(t["passed"] for t in targets)
        lines += ["", f"Stock onnxruntime against the training build, at {config} ({passed}/{len(targets)} pass):", ""]
        lines += [f"- {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['margin']}" for t in targets]
    for config, targets in results["targets"].items():
        passed = sum(t["passed"] for t in targets)
        lines += ["", f"Targets, edgeftl cases at {config} ({passed}/{len(targets)} pass; (a) at micro-batch "
                      f"{BATCH}):", ""]
        lines += [f"- {'PASS' if t['passed'] else 'MISS'} {t['target']}: {t['margin']}" for t in targets]
    lines += ["", _arm64_line(results), "", _runtime_line(results), "", _work_line(results), "",
              _checks_line(results), "", _quiet_line(results), "", _ranges_line(results), "", _machine_line(results)]
    return "\n".join([*lines, END])


def _arm64_line(results: dict) -> str:
    """Step times on the emulated ARM64 board, when the run had --arm64."""
    runs = results.get("arm64_emulated")
    if not runs:
        return ""
    first = runs[0]
    parts = [f"({r['case']}) {CASES[r['case']][0]}: steps {', '.join(f'{t:.1f}' for t in r['step_times_s'])} s, "
             f"peak RSS {r['peak_rss_mib']:.0f} MiB" for r in runs]
    return (f"ARM64 under emulation (not a target): qemu-user, Debian 12 {first['machine']}, Python {first['python']}, "
            f"onnxruntime {first['onnxruntime']} from its aarch64 wheel, batch {first['batch']} x {first['seq']}: "
            + "; ".join(parts) + ". Emulated, these steps run ~110-210x slower than natively here "
            "(0.08 and 0.06 s); they say the "
            "bundles train there, not how fast a board is.")


def _runtime_line(results: dict) -> str:
    """RSS after load with and without the runtime every device process holds before a model."""
    alone = results.get("runtime_alone_rss_mib", {})
    base = alone.get("stock", alone).get("median")  # runs before the stock runtime: one figure
    if base is None:
        return ""
    rows = results["cases"]
    b, c, d = (rows[f"{k}{BATCH}"]["rss_after_load_mib"] for k in "bcd")
    training = alone.get("training", {}).get("median")
    both = f" ({training:.0f} MiB with the training build)" if training is not None else ""
    return (f"RSS after load, model part: a process that loads everything but a model (Python, numpy, stock ONNX "
            f"Runtime, tokenizer, data) holds {base:.0f} MiB{both}; above that, loading the model and its training "
            f"sessions adds fp32 {b - base:.0f}, int8 {c - base:.0f}, int4 {d - base:.0f} MiB: int8 / fp32 = "
            f"{(c - base) / (b - base):.2f}x (the target above is on whole-process RSS, {c / b:.2f}x)."
            + _load_floor(results, base))


def _load_floor(results: dict, base: float) -> str:
    """Why (c) <= 0.5 x (b) after load cannot hold: what the shared part would have to fit in."""
    sizes = results.get("checkpoint_mib")
    if not sizes:
        return ""
    w32, w8 = sizes["fp32"], sizes["int8"]
    return (f" With R the memory both processes hold besides their checkpoint (runtime, sessions), "
            f"R + {w8:.0f} <= 0.5 x (R + {w32:.0f}) needs R <= {w32:.0f} - 2 x {w8:.0f} = {w32 - 2 * w8:.0f} MiB "
            f"(fp32 and int8 checkpoint sizes); the runtime alone holds {base:.0f} MiB, so no bundle format "
            f"whose weights are resident once loaded meets that target in this device process.")


def _step_gflop() -> dict[str, float]:
    """Matrix-product GFLOP of one training step, full depth and top 2 blocks, from the model's sizes.

    Exact backpropagation for LoRA on query/value: every trainable block runs forward; every one
    but the lowest also passes the gradient to its input (all 6 projections + attention: 2 x
    forward attention); the lowest needs no input gradient and no key gradient, only the
    gradient through its output projection, FFN and attention down to query and value.
    LoRA, head and elementwise work are left out (under 1%), and so is the attention-score
    product the bundles recompute for the backward pass (0.2 GFLOP per block): this is the least
    work exact training needs, not what the graphs do.
    """
    from edgeftl.models.loading import default_model_dir

    config = json.loads((default_model_dir() / "config.json").read_text(encoding="utf-8"))
    hidden, ffn, blocks = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tokens, attention = BATCH * SEQ, 2 * BATCH * SEQ * SEQ * hidden  # one QK^T or PV product
    forward = 2 * tokens * (4 * hidden**2 + 2 * hidden * ffn) + 2 * attention
    backward = 2 * tokens * (4 * hidden**2 + 2 * hidden * ffn) + 4 * attention
    lowest = 2 * tokens * (hidden**2 + 2 * hidden * ffn) + 3 * attention

    def step(trained: int) -> float:
        return (trained * forward + (trained - 1) * backward + lowest) / 1e9

    return {"full_depth": step(blocks), "top_2": step(2)}


def _work_line(results: dict) -> str:
    """(e) vs (b): the arithmetic each step has to do, and the rate each one did it at."""
    work = results.get("step_gflop")
    if not work:
        return ""
    rows = results["cases"]
    b, e = rows[f"b{BATCH}"]["median_step_time_s"], rows[f"e{BATCH}"]["median_step_time_s"]
    return (f"Work per step (matrix products, exact backpropagation, counted from the model's sizes; "
            f"`_step_gflop`): full depth {work['full_depth']:.1f} GFLOP, top 2 blocks {work['top_2']:.1f} GFLOP, "
            f"ratio {work['top_2'] / work['full_depth']:.2f}x. Measured at micro-batch {BATCH}: (b) "
            f"{work['full_depth'] / b:.0f} GFLOP/s, (e) {work['top_2'] / e:.0f} GFLOP/s, so (e) / (b) per step "
            f"{e / b:.2f}x sits at that ratio; 0.2x would need (e) to run "
            f"{work['top_2'] / work['full_depth'] / 0.2:.1f}x as many GFLOP/s as (b).")


def _checks_line(results: dict) -> str:
    rows = results["cases"].values()
    device = [r for r in rows if r["case"] != "a"]
    torch_free = not any(r["imported_torch_any"] for r in device)
    return (f"Checks: edgeftl processes torch-free (`'torch' not in sys.modules` at the end): "
            f"{'yes' if torch_free else 'NO'}; BundleRuntime.encode gives the benchmark's token ids: "
            f"{'yes' if all(r['encode_matches'] for r in device) else 'NO'}; all losses finite: "
            f"{'yes' if all(r['losses_finite'] for r in rows) else 'NO'}.")


def _quiet_line(results: dict) -> str:
    """Step times from the runs that had the machine to themselves, where there were any."""
    rows = results["cases"]
    parts = [f"({r['case']}) mb {r['micro_batch']}: "
             + (f"{r['quiet_median_step_time_s']:.2f} s (n={r['quiet_runs']})" if r["quiet_runs"] else "none")
             for r in rows.values()]
    text = (f"Undisturbed runs only (other processes under {100 * QUIET_SHARE:.0f}% of the CPUs), median step: "
            + "; ".join(parts) + ".")
    a, b16 = rows[f"a{BATCH}"], rows[f"b{BATCH}"]
    if a["quiet_runs"] and b16["quiet_runs"]:
        text += (f" On those, (b) / (a) at micro-batch {BATCH} = "
                 f"{b16['quiet_median_step_time_s'] / a['quiet_median_step_time_s']:.2f}x.")
    for micro in MICRO_BATCHES:
        b, e = rows[f"b{micro}"], rows[f"e{micro}"]
        if b["quiet_runs"] and e["quiet_runs"]:
            text += (f" (e) / (b) epoch at micro-batch {micro} = "
                     f"{e['quiet_median_step_time_s'] / b['quiet_median_step_time_s']:.2f}x (from median steps).")
    return text


def _ranges_line(results: dict) -> str:
    parts = [f"({r['case']}) mb {r['micro_batch']}: peak {r['peak_rss_range'][0]:.0f}-{r['peak_rss_range'][1]:.0f} "
             f"MiB, step {r['median_step_time_range'][0]:.2f}-{r['median_step_time_range'][1]:.2f} s, others' "
             f"CPU share {100 * min(r['others_cpu_shares']):.0f}-{100 * max(r['others_cpu_shares']):.0f}%"
             for r in results["cases"].values()]
    return "Spread over repeats (min-max): " + "; ".join(parts) + "."


def _machine() -> dict:
    m = benchdoc.machine()
    for name in ("transformers", "peft"):
        try:
            m[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return m


def _machine_line(results: dict) -> str:
    from edgeftl.coordinator.bundler import training_build

    m, src = results["machine"], results["source"]
    ort = (f"onnxruntime {m['onnxruntime']} (stock) and {training_build.PACKAGE} {training_build.VERSION}"
           if m.get("onnxruntime") else f"onnxruntime-training {m.get('onnxruntime-training-cpu', '?')}")
    low, mid, high = results["loadavg_1min_during_runs"]
    busy = results["others_cpu_share_during_runs"]
    return (f"Machine: {m['nproc']} CPUs (nproc), {m['ram_gib']} GiB RAM, {m['cpu']}, shared with other work: "
            f"other processes used {100 * busy[1]:.0f}% of its CPUs during the median run (range "
            f"{100 * busy[0]:.0f}-{100 * busy[2]:.0f}%; 1-minute load average {low:.1f}-{high:.1f}, "
            f"median {mid:.1f}), so step times are only comparable within one run of this script; "
            f"Python {m['python']}, {ort}, torch {m.get('torch', '?')}, transformers "
            f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}; {m['date']}. Commit {src['commit']}"
            f"{' + uncommitted changes' if src['dirty'] else ''}. Whole run: {results['total_wall_s']:.0f} s. "
            "Raw numbers, every run: `docs/bench_device.json`.")


def _write_doc(section: str) -> None:
    """Replace this benchmark's marked section of docs/BENCHMARKS.md, keeping everything else."""
    benchdoc.write_section("bench_device", section)


if __name__ == "__main__":
    sys.exit(main())
