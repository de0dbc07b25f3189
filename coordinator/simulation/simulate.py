"""`edgeftl simulate`: a whole federation on one machine, with real processes and a real broker.

Reads top to bottom like the run: bundle, data split (held-out test + Dirichlet across devices),
broker, device processes (torch-free, one OS process each), coordinator rounds, summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeftl.coordinator.bundler.config import SEQ_LEN_RANGE
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.simulation.partition import dirichlet_split
from edgeftl.device.data import (
    DataError,
    bbc_labels,
    check_task,
    file_labels,
    load_bbc,
    read_examples,
    stratified_split,
    write_csv,
)
from edgeftl.device.protocol.manifest import ADAPTERS, CAUSAL_LM, CLASSIFY, LORA, MANIFEST, TASKS, read_manifest

DEFAULT_LM = "smollm2"  # the packaged causal LM a causal-lm simulation builds when no --model is given


@dataclass
class SimulationConfig:
    out: Path
    devices: int = 5
    data: str = "bbc"  # "bbc" or a CSV/JSONL file (text only for causal-lm)
    task: str | None = None  # classify | causal-lm; None = the bundle's task, or classify when building
    alpha: float = 0.5
    test_fraction: float = 0.2
    max_per_device: int | None = None  # cap examples per device (fast demos)
    max_test: int | None = None
    broker: str | None = None  # None = start the embedded amqtt broker
    bundle: Path | None = None  # None = build `model` (int8 + LoRA) into out/bundle, labelled as `data` is
    model: Path | None = None  # Hugging Face folder to build from; None = the packaged MiniLM (classify) or SmolLM2
    quant: str = "int8"
    adapter: str = LORA  # what a bundle built here trains (`edgeftl build --adapter`)
    targets: tuple[str, ...] = ()  # the linears it adapts; () = the build's default (query, value)
    train_layers: int | None = None  # build with LoRA only in the top K blocks (cached lower stack)
    max_seq_len: int | None = None  # tokens per text of a bundle built here (default: the build's)
    device_threads: int = 1
    simulated_speed_spread: float = 1.0  # simulation only: device i of n sleeps to look spread^(i/(n-1)) x slower
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1.0 <= self.simulated_speed_spread <= 1000.0:
            raise ValueError(f"--simulated-speed-spread must be in 1..1000, got {self.simulated_speed_spread}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; accepted tasks: {', '.join(TASKS)}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; accepted: {', '.join(ADAPTERS)}")
        low, high = SEQ_LEN_RANGE
        if self.max_seq_len is not None and not low <= self.max_seq_len <= high:
            raise ValueError(f"--max-seq-len must be in {low}..{high} (tokens per text), got {self.max_seq_len}")


def run_task(sim: SimulationConfig) -> str:
    """The run's task: `sim.task` once it agrees with the bundle's, else the bundle's (classify when building).

    Raises:
        DataError: a bundle of the other task (one line, before any work).
    """
    if sim.bundle is None:
        return sim.task or CLASSIFY
    bundle_task = read_manifest(sim.bundle).task
    if sim.task is not None and sim.task != bundle_task:
        raise DataError(f"--task {sim.task}, but bundle {sim.bundle} is {bundle_task}; pass --task {bundle_task} "
                        f"or a {sim.task} bundle (or no --bundle, to build one)")
    return bundle_task


def run_labels(sim: SimulationConfig) -> list[str]:
    """The labels the run trains with, once `sim.data` is checked against `sim.bundle`.

    Reads only the data file and the bundle's manifest: a mismatch stops the run before any
    process starts or any folder is written. Without a bundle, the labels are the data's own
    (sorted), and the bundle is built with them; a causal-lm run has none (its data is text only).

    Raises:
        DataError: one line naming the mismatch and what is accepted.
        BundleError: `sim.bundle` is not a bundle.
    """
    if run_task(sim) == CAUSAL_LM:
        if sim.data != "bbc":
            check_task(Path(sim.data), CAUSAL_LM, [])
        return []
    if sim.bundle is None:
        labels = bbc_labels() if sim.data == "bbc" else file_labels(Path(sim.data))
        commas = [label for label in labels if "," in label]
        if commas:
            raise DataError(f"{sim.data}: label {commas[0]!r} has a comma, which `edgeftl build --labels` "
                            "cannot name; rename it or build the bundle yourself and pass --bundle")
        return labels
    manifest = read_manifest(sim.bundle)
    if sim.data != "bbc":
        check_task(Path(sim.data), manifest.task, manifest.labels)
    elif manifest.task == CLASSIFY and not set(bbc_labels()) <= set(manifest.labels):
        raise DataError(f"BBC News topics {', '.join(bbc_labels())} are not all labels of bundle {sim.bundle} "
                        f"(accepted labels: {', '.join(manifest.labels)})")
    return list(manifest.labels)


def build_bundle_if_needed(sim: SimulationConfig, labels: list[str]) -> Path:
    """`sim.bundle`, or a bundle built into the run folder for `labels` (rebuilt if its task or labels
    differ); a causal-lm run builds `--task causal-lm` without labels."""
    if sim.bundle is not None:
        return sim.bundle
    task = run_task(sim)
    split = f"-top{sim.train_layers}" if sim.train_layers else ""
    kind = "" if sim.adapter == LORA else f"-{sim.adapter}"
    bundle = sim.out / f"bundle-{'lm-' if task == CAUSAL_LM else ''}{sim.quant}{split}{kind}"
    built = read_manifest(bundle) if (bundle / MANIFEST).is_file() else None
    seq_differs = built is not None and sim.max_seq_len is not None and built.max_seq_len != sim.max_seq_len
    shape_differs = built is not None and (built.adapter.kind != sim.adapter
                                           or (bool(sim.targets) and built.adapter.targets != list(sim.targets)))
    if built is None or built.task != task or built.labels != labels or seq_differs or shape_differs:
        extra = ["--train-layers", str(sim.train_layers)] if sim.train_layers else []
        extra += ["--adapter", sim.adapter] + (["--targets", ",".join(sim.targets)] if sim.targets else [])
        extra += ["--max-seq-len", str(sim.max_seq_len)] if sim.max_seq_len else []
        model = sim.model or (DEFAULT_LM if task == CAUSAL_LM else None)
        extra += ["--model", str(model)] if model else []
        extra += ["--labels", ",".join(labels)] if task == CLASSIFY else []
        subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "build", "--quant", sim.quant, "--task", task,
                        "--out", str(bundle), "--force", *extra], check=True)
    return bundle


def split_data(sim: SimulationConfig, label_names: list[str], task: str = CLASSIFY) -> tuple[list[Path], Path]:
    """Write one CSV per device (Dirichlet(alpha) over labels) and the held-out test CSV (stratified).

    A causal-lm run splits BBC articles the same way by topic and writes the text alone; a text-only
    file has no topics, so only the devices' shares of it differ.
    """
    if sim.data == "bbc":
        texts, labels, _ = load_bbc()
    else:
        examples = read_examples(Path(sim.data), task, label_names if task == CLASSIFY else None)
        texts, labels = [e.text for e in examples], [e.label or "" for e in examples]
    train_idx, test_idx = stratified_split(labels, sim.test_fraction, sim.seed)
    rng = np.random.default_rng(sim.seed)
    if sim.max_test:
        test_idx = rng.permutation(test_idx)[: sim.max_test]
    parts = dirichlet_split([labels[i] for i in train_idx], sim.devices, sim.alpha, sim.seed)
    folder = sim.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for device, part in enumerate(parts):
        rows = train_idx[part]
        if sim.max_per_device:
            rows = rng.permutation(rows)[: sim.max_per_device]
        files.append(_write_split(folder / f"device{device:02d}.csv", rows, texts, labels, task))
    return files, _write_split(folder / "test.csv", test_idx, texts, labels, task)


def _write_split(path: Path, rows: np.ndarray, texts: list[str], labels: list[str], task: str) -> Path:
    """The rows' texts, with their labels for classify (a causal LM trains on the text alone)."""
    return write_csv(path, [texts[i] for i in rows], [labels[i] for i in rows] if task == CLASSIFY else None)


@contextlib.contextmanager
def broker_for(sim: SimulationConfig):
    if sim.broker:
        yield sim.broker
        return
    from edgeftl.coordinator.simulation.broker import EmbeddedBroker

    with EmbeddedBroker(log_file=sim.out / "broker.log") as broker:
        yield broker.url


@contextlib.contextmanager
def device_processes(sim: SimulationConfig, url: str, bundle: Path, files: list[Path], prefix: str,
                     programs: dict[str, list[str]] | None = None):
    """One `edgeftl device run` process per device; logs under out/devices/.

    `programs` maps a device id (dev00, dev01, ...) to the command run instead of `edgeftl device
    run`, given the same flags (a benchmark's attacking device, for example).
    """
    logs = sim.out / "devices"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(sim.device_threads)}
    processes = []
    try:
        for device, data in enumerate(files):
            name = f"dev{device:02d}"
            program = (programs or {}).get(name, [sys.executable, "-m", "edgeftl.device.cli", "device", "run"])
            command = [*program, "--broker", url,
                       "--bundle", str(bundle), "--data", str(data), "--id", name, "--prefix", prefix,
                       "--threads", str(sim.device_threads), "--state", str(logs / name),
                       "--cache-dir", str(sim.out / "cache"), *slowdown_flag(sim, device, len(files))]
            log = open(logs / f"{name}.log", "w")
            processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        yield [p for p, _ in processes]
    finally:
        for process, _ in processes:
            process.terminate()
        for process, log in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def slowdown_flag(sim: SimulationConfig, device: int, devices: int) -> list[str]:
    """Simulation only: device `device` of `devices` looks spread^(device / (devices - 1)) times slower."""
    if sim.simulated_speed_spread == 1.0:
        return []
    slowdown = sim.simulated_speed_spread ** (device / max(1, devices - 1))
    return ["--simulated-slowdown", f"{slowdown:.4f}"]


def simulate(sim: SimulationConfig, rounds: CoordinatorConfig, on_round: Callable[[dict], None],
             on_start: Callable[[object], None] | None = None,
             programs: dict[str, list[str]] | None = None) -> list[dict]:
    from edgeftl.coordinator.rounds.evaluate import make_evaluator
    from edgeftl.coordinator.rounds.fedbuff import make_coordinator
    from edgeftl.device.link import Link, MqttConnection
    from edgeftl.device.protocol.manifest import verify_bundle
    from edgeftl.device.protocol.topics import coordinator_client_id
    from edgeftl.device.runtime import trainable_vector

    labels = run_labels(sim)  # before anything is written
    sim.out.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle_if_needed(sim, labels)
    manifest = verify_bundle(bundle)
    files, test = split_data(sim, manifest.labels, manifest.task)
    (sim.out / "config.json").write_text(json.dumps(
        {"simulation": {k: str(v) for k, v in vars(sim).items()},
         "rounds": {k: str(v) for k, v in vars(rounds).items()},
         "bundle": {"model_id": manifest.model_id, "quantization": manifest.quantization.scheme,
                    "task": manifest.task, "labels": manifest.labels,
                    "adapter": asdict(manifest.adapter), "trainable_params": manifest.trainable_count}},
        indent=2, sort_keys=True) + "\n")
    rounds.force = not rounds.resume  # a simulation starts over in its folder unless resumed
    evaluate = make_evaluator(bundle, test, threads=2, cache_dir=sim.out / "cache")
    initial = trainable_vector(bundle, manifest)
    with broker_for(sim) as url, device_processes(sim, url, bundle, files, rounds.prefix, programs) as processes:
        link = Link.coordinator(MqttConnection(url, coordinator_client_id(rounds.prefix)), rounds.prefix)
        coordinator = make_coordinator(link, bundle, manifest, initial, rounds, evaluate, on_round)
        if on_start is not None:
            on_start(coordinator)
        try:
            coordinator.connect()
            online = coordinator.wait_for_devices()
            dead = [p.args[p.args.index("--id") + 1] for p in processes if p.poll() is not None]
            if online < rounds.wait_devices:
                raise RuntimeError(f"only {online} of {rounds.wait_devices} devices came online "
                                   f"(exited: {dead or 'none'}); see {sim.out / 'devices'}")
            return coordinator.run()
        finally:
            link.close()
