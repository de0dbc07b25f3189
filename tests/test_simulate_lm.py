"""`edgeftl simulate --task causal-lm`: a causal-LM federation over a real Mosquitto whose records,
live line and report carry held-out perplexity; BBC split by topic as text alone; task/bundle
mismatches are one line before any work."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fixtures_build import bundle, tiny_model
from tiny_models import WORDS

ROUNDS = 3
SENTENCES = 4  # distinct sentences, each repeated: the held-out texts are ones the devices train on


def edgeftl(*args: str) -> subprocess.CompletedProcess:
    """The `edgeftl` CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edgeftl.device.cli", *args], capture_output=True, text=True,
                          timeout=600)


def repeated_texts_csv(path: Path, copies: int = 16) -> Path:
    """A text-only file of a few tiny-vocabulary sentences, each repeated `copies` times."""
    import numpy as np

    from edgeftl.device.data import write_csv

    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=8)) for _ in range(SENTENCES)]
    return write_csv(path, [sentences[i % SENTENCES] for i in range(SENTENCES * copies)])


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, mosquitto_broker) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-device causal-LM simulation of the tiny Llama, built by simulate itself, over Mosquitto."""
    folder = tmp_path_factory.mktemp("lm-run")
    data = repeated_texts_csv(folder / "texts.csv")
    host, port = mosquitto_broker
    out = folder / "run"
    result = edgeftl("simulate", "--task", "causal-lm", "--model", str(tiny_model(tmp_path_factory, "llama")),
                     "--data", str(data), "--devices", "2", "--alpha", "100", "--rounds", str(ROUNDS),
                     "--steps", "4", "--batch", "8", "--lr", "0.01", "--broker", f"mqtt://{host}:{port}",
                     "--max-seq-len", "24", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_causal_lm_federation_records_perplexity_each_round(lm_run):
    out, result = lm_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(ROUNDS))
    assert all(r["updates_received"] == 2 for r in records)
    for r in records:
        assert "accuracy" not in r
        assert math.isfinite(r["perplexity"]) and r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-3)
    # the held-out sentences are the devices' own, repeated: training lowers their perplexity
    assert records[-1]["perplexity"] < records[0]["perplexity"]
    manifest = json.loads((out / "bundle-lm-int8" / "manifest.json").read_text())
    assert manifest["task"] == "causal-lm" and manifest["labels"] == []
    assert manifest["max_seq_len"] == 24  # simulate --max-seq-len reaches the build
    assert (out / "data" / "device00.csv").read_text().splitlines()[0] == "text"
    lines = result.stdout.splitlines()  # the build's line, a line per round, then the JSON summary
    summary = json.loads("\n".join(lines[lines.index("{"):]))
    assert summary["final_perplexity"] == records[-1]["perplexity"] and "final_accuracy" not in summary
    assert f"perplexity {records[-1]['perplexity']:.1f}" in lines[lines.index("{") - 1]


def test_report_of_a_causal_lm_run_shows_perplexity(lm_run):
    out, _ = lm_run
    result = edgeftl("report", str(out), "--out", str(out / "report" / "index.html"))
    assert result.returncode == 0, result.stderr
    html = (out / "report" / "index.html").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = min(r["perplexity"] for r in records)
    assert f"final held-out perplexity</th><td>{records[-1]['perplexity']:.2f}" in html.replace("\n", "")
    assert f"best held-out perplexity</th><td>{best:.2f}" in html.replace("\n", "")
    assert "test accuracy" not in html
    assert (out / "report" / "index-perplexity.png").stat().st_size > 0
    assert not (out / "report" / "index-accuracy.png").exists()


def test_live_line_shows_perplexity_instead_of_accuracy():
    from edgeftl.coordinator.cli.coordinator import round_line
    from edgeftl.coordinator.cli.live import Progress, status_text

    record = {"round": 2, "updates_received": 3, "devices_selected": 3, "updates_late": 0, "updates_rejected": 0,
              "loss": 3.1527, "perplexity": 23.394, "bytes_up": 2048, "device_peak_rss_mib": 90.0, "wall_s": 1.5}
    assert "3/3 updates (0 late, 0 rejected) perplexity 23.4 loss 3.1527" in round_line(record)
    p = Progress(round=2, online=3, selected=3, received=1, late=0, rejected=0, bytes_up=0, bytes_down=0,
                 accuracy=None, elapsed_s=1.0, perplexity=23.394)
    assert status_text(p, 5).startswith("round 3/5 | perplexity 23.4 | 3 online")


def test_bbc_for_a_causal_lm_is_text_split_by_topic(tmp_path):
    from edgeftl.coordinator.simulation.simulate import SimulationConfig, split_data
    from edgeftl.device.data import load_bbc

    texts, topics, names = load_bbc()
    topic_of = dict(zip(texts, topics))
    sim = SimulationConfig(out=tmp_path, devices=4, alpha=0.1, task="causal-lm", max_test=100)
    files, test = split_data(sim, [], "causal-lm")
    import csv

    def topics_in(path: Path) -> Counter:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["text"]  # text alone: a causal LM has no label
        return Counter(topic_of[row["text"]] for row in rows)

    assert set(topics_in(test)) == set(names)  # the held-out set comes from every topic
    shares = [max(c.values()) / sum(c.values()) for c in map(topics_in, files)]
    assert max(shares) > 0.5  # Dirichlet(0.1) over topics: some device is dominated by one topic


@pytest.mark.parametrize("bundle_name, extra, problem", [
    ("bert-int8", ("--task", "causal-lm"), "--task causal-lm, but bundle"),
    ("llama-int8", ("--task", "classify"), "--task classify, but bundle"),
    (None, ("--task", "causal-lm", "--data", "LABELLED"), "has labels, but the bundle is causal-lm"),
    (None, ("--task", "causal-lm", "--max-seq-len", "4"), "--max-seq-len must be in 8..8192"),
    (None, ("--adapter", "lora-xxl"), "unknown adapter 'lora-xxl'; accepted: lora, head, lora-fa, lora-xs"),
])
def test_a_task_that_does_not_fit_is_one_line(tmp_path, tmp_path_factory, bundle_name, extra, problem):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\nthe market,neg\nthe team,pos\n")
    args = [str(labelled) if a == "LABELLED" else a for a in extra]
    if bundle_name:
        args += ["--bundle", str(bundle(tmp_path_factory, bundle_name))]
    out = tmp_path / "run"
    result = edgeftl("simulate", *args, "--devices", "2", "--rounds", "1", "--out", str(out))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and problem in lines[0], result.stderr
    assert not out.exists()


def test_coordinator_eval_of_a_labelled_file_for_a_causal_lm_is_one_line(tmp_path, tmp_path_factory):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\nthe market,neg\nthe team,pos\n")
    result = edgeftl("coordinator", "--broker", "mqtt://127.0.0.1:1", "--bundle",
                     str(bundle(tmp_path_factory, "llama-int8")), "--eval", str(labelled), "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "has labels, but the bundle is causal-lm" in lines[0], result.stderr
