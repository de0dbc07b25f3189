"""`edgeftl simulate --data FILE`: the bundle is built for the file's own labels, and a file that
does not fit a given bundle is one error line before any work (no folder, no process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_build import bundle, tiny_model
from tiny_models import WORDS

OWN_LABELS = ("positive", "negative", "neutral")  # none of them a BBC topic


def own_labels_csv(path: Path, rows: int = 60) -> Path:
    """`rows` short sentences of the tiny vocabulary, each label keyed to a word of its own."""
    import numpy as np

    from edgeftl.device.data import write_csv

    rng = np.random.default_rng(0)
    keys = {"positive": "album", "negative": "court", "neutral": "season"}
    others = [w for w in WORDS if w not in keys.values()]
    labels = [OWN_LABELS[i % 3] for i in range(rows)]
    texts = [" ".join([*rng.choice(others, size=5), keys[label]]) for label in labels]
    return write_csv(path, texts, labels)


def simulate(*args: str) -> subprocess.CompletedProcess:
    """`edgeftl simulate` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory, "bert")


def test_simulate_builds_for_the_files_own_labels(tmp_path, bert_model, mosquitto_broker):
    data = own_labels_csv(tmp_path / "mine.csv")
    out = tmp_path / "run"
    host, port = mosquitto_broker
    result = simulate("--data", str(data), "--model", str(bert_model), "--devices", "2", "--rounds", "1",
                      "--alpha", "100", "--broker", f"mqtt://{host}:{port}", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sorted(OWN_LABELS)
    lines = result.stdout.splitlines()  # the build's line and a line per round, then the JSON summary
    summary = json.loads("\n".join(lines[lines.index("{"):]))
    assert summary["labels"] == expected and summary["rounds"] == 1
    assert "labels: negative, neutral, positive" in result.stderr.splitlines()[0]
    manifest = json.loads((out / "bundle-int8" / "manifest.json").read_text())
    assert manifest["labels"] == expected
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["updates_received"] == 2


@pytest.mark.parametrize("bundle_name, rows, problem", [
    ("bert-int8", "text,label\nthe market,neutral\nthe team,pos\n",
     "unknown label 'neutral'; accepted labels: neg, pos"),
    ("bert-int8", "text\nthe market\nthe team\n", "has no labels, but the bundle classifies into neg, pos"),
    ("llama-int8", "text,label\nthe market,neg\nthe team,pos\n", "has labels, but the bundle is causal-lm"),
])
def test_a_file_that_does_not_fit_the_bundle_is_one_line(tmp_path, tmp_path_factory, bundle_name, rows, problem):
    data = tmp_path / "mine.csv"
    data.write_text(rows)
    out = tmp_path / "run"
    result = simulate("--data", str(data), "--bundle", str(bundle(tmp_path_factory, bundle_name)),
                      "--devices", "2", "--rounds", "1", "--out", str(out))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and problem in lines[0], result.stderr
    assert not out.exists()


def test_a_file_with_one_label_is_one_line(tmp_path):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\nthe market,pos\nthe team,pos\n")
    result = simulate("--data", str(data), "--devices", "2", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"edgeftl: error: {data}: only one label ('pos'); "
                                          "classification needs at least 2"]
    assert not (tmp_path / "run").exists()


def test_device_train_names_the_bad_label_and_the_accepted_ones(tmp_path, tmp_path_factory):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\nthe market,neutral\n")
    result = subprocess.run([sys.executable, "-m", "edgeftl.device.cli", "device", "train", "--bundle",
                             str(bundle(tmp_path_factory, "bert-int8")), "--data", str(data)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"edgeftl: error: {data}: line 2: unknown label 'neutral'; "
                                          "accepted labels: neg, pos"]
