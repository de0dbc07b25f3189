"""Tiny model folders and bundles shared by test_build.py and test_device_runtime.py.

Plain helpers, not fixtures: each test module wraps them in its own fixtures, and the cache
below makes every folder and bundle exist once per test session, whichever module asks first.
Bundles are built through the `edgeftl` CLI in-process, as a user would build them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import WORDS, tiny_bert, tiny_llama

LABELS = ("neg", "pos")
# (model, extra CLI flags) per bundle name; every BERT bundle classifies into LABELS.
BUNDLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "bert-int8": ("bert", ("--quant", "int8")),
    # hidden 32: two blocks per row; all int4
    "bert-int4": ("bert", ("--quant", "int4", "--block-size", "16", "--int4-int8-top", "0")),
    "bert-none": ("bert", ("--quant", "none")),
    "bert-int8-top1": ("bert", ("--quant", "int8", "--train-layers", "1")),
    "bert-int8-keep-attention": ("bert", ("--quant", "int8", "--keep-attention")),
    "bert-head": ("bert", ("--quant", "int8", "--adapter", "head")),
    "bert-lora-fa": ("bert", ("--quant", "int8", "--adapter", "lora-fa")),
    "bert-lora-xs": ("bert", ("--quant", "int8", "--adapter", "lora-xs")),
    "llama-int8": ("llama", ("--task", "causal-lm", "--quant", "int8")),
    "llama-int8-top1": ("llama", ("--task", "causal-lm", "--quant", "int8", "--train-layers", "1")),
    # block 0 int4, block 1 (the top) and the LM head int8
    "llama-int4": ("llama", ("--task", "causal-lm", "--quant", "int4", "--block-size", "16", "--int4-int8-top", "1")),
}

_cache: dict[str, Path] = {}


def tiny_model(factory: pytest.TempPathFactory, kind: str) -> Path:
    """The session's tiny random "bert" or "llama" Hugging Face folder (2 blocks, hidden 32)."""
    key = f"model:{kind}"
    if key not in _cache:
        make = {"bert": tiny_bert, "llama": tiny_llama}[kind]
        _cache[key] = make(factory.mktemp(f"tiny-{kind}"))
    return _cache[key]


def bundle(factory: pytest.TempPathFactory, name: str) -> Path:
    """The session's bundle `name` (a key of BUNDLES), built once with `edgeftl build`.

    Its ONNX Runtime Training artifacts are kept beside it (`reference`). Tests that change a
    bundle must work on a copy.
    """
    key = f"bundle:{name}"
    if key not in _cache:
        from edgeftl.device.cli import main

        kind, flags = BUNDLES[name]
        out = factory.mktemp("bundles", numbered=True) / name
        args = ["build", "--model", str(tiny_model(factory, kind)), "--out", str(out), "--quiet",
                "--reference-dir", str(out.with_name(name + ".reference")), *flags]
        if kind == "bert":
            args += ["--labels", ",".join(LABELS)]
        rc = main(args)
        assert rc == 0, f"building {name} failed with exit code {rc}"
        _cache[key] = out
    return _cache[key]


def reference(factory: pytest.TempPathFactory, name: str) -> Path:
    """ONNX Runtime Training's own artifacts for the session's bundle `name` (training-build runs only)."""
    folder = bundle(factory, name)
    return folder.with_name(name + ".reference")


def keyword_dataset(n: int, seed: int, keyword: str = "market") -> tuple[list[str], list[str]]:
    """Separable toy classification: "pos" exactly when the sentence contains `keyword`.

    Sentences are 4-8 words drawn from the tiny tokenizer's vocabulary, so no token is unknown;
    half of them get the keyword at a random position.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    others = [w for w in WORDS if w != keyword]
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(others, size=int(rng.integers(4, 9))))
        positive = i % 2 == 1
        if positive:
            words.insert(int(rng.integers(0, len(words) + 1)), keyword)
        texts.append(" ".join(words))
        labels.append(LABELS[int(positive)])
    return texts, labels


def in_process_devices(broker, folder: Path, files: list[Path], rounds: int, stop_after_s: float = 120):
    """Device agents on an in-process broker, one thread each, announcing themselves online.

    Returns (agents, threads); start the threads after the coordinator is built.
    """
    import threading

    from edgeftl.device.agent import AgentConfig, DeviceAgent

    agents = []
    for i, path in enumerate(files):
        name = f"dev{i}"
        agent = DeviceAgent(device_link(broker, name), AgentConfig(name, folder, path, threads=1))
        agent.start()
        agents.append(agent)
    threads = [threading.Thread(target=a.run, kwargs={"max_rounds": rounds, "stop_after_s": stop_after_s},
                                daemon=True) for a in agents]
    return agents, threads


def in_process_federation(folder: Path, files: list[Path], config, eval_csv: Path):
    """A whole federation in this process: a device agent per data file, a coordinator with an
    evaluator on `eval_csv`, `config.rounds` rounds. Returns (coordinator, its records)."""
    from edgeftl.coordinator.rounds.evaluate import make_evaluator
    from edgeftl.coordinator.rounds.loop import Coordinator
    from edgeftl.device.link import InProcessBroker
    from edgeftl.device.protocol.manifest import read_manifest

    broker = InProcessBroker()
    agents, threads = in_process_devices(broker, folder, files, rounds=config.rounds)
    coordinator = Coordinator(coordinator_link(broker, "coordinator"), folder, read_manifest(folder),
                              agents[0].runtime.get_flat(), config, evaluate=make_evaluator(folder, eval_csv))
    for t in threads:
        t.start()
    coordinator.connect()
    assert coordinator.wait_for_devices() == len(files)
    records = coordinator.run()
    for t in threads:
        t.join(timeout=30)
    return coordinator, records


def device_link(broker, name: str, prefix: str = "edgeftl"):
    """A device's link through an in-process broker (status online on connect, offline as will)."""
    from edgeftl.device.link import InProcessConnection, Link

    return Link.device(InProcessConnection(broker, name), prefix, name)


def coordinator_link(broker, name: str = "coordinator", prefix: str = "edgeftl", **limits: int):
    """The coordinator's link through an in-process broker."""
    from edgeftl.device.link import InProcessConnection, Link

    return Link.coordinator(InProcessConnection(broker, name), prefix, **limits)
