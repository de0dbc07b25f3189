"""Tests for the device features around the training loop: the lower-stack cache, local state and
resume, validation split, measurement, memory planning, bad input and micro-batching.

Bundles are the tiny ones from fixtures_build.py (built once per session). Every CLI run passes
--cache-dir under tmp, so nothing is written to the user's ~/.cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeftl.device.cache import CACHE_ENV, FEATURES, META, default_cache_dir, entry_folder, open_or_build
from edgeftl.device.cli import main
from edgeftl.device.data import read_examples, write_csv
from edgeftl.device.files import append_jsonl
from edgeftl.device.measure import platform_info, proc_status_mib, run_metrics
from edgeftl.device.plan import MemoryLimitError, MemoryPlan, Probe, fit_micro_batch, measure_plan
from edgeftl.device.protocol.manifest import MANIFEST
from edgeftl.device.runtime import BundleRuntime
from edgeftl.device.state import Progress, StateError, load_state, save_state
from edgeftl.device.train import TrainConfig, accumulate_batch, train

from fixtures_build import LABELS, bundle, keyword_dataset
from tiny_models import WORDS

SPLIT = "bert-int8-top1"  # lower block frozen in lower_model.onnx, top block trained


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small files: keyword task (24 rows: 3 batches of 8), its held-out file, a text-only LM file."""
    root = tmp_path_factory.mktemp("features-data")
    rng = np.random.default_rng(5)
    lm_texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 14)))) for _ in range(16)]
    fixed = [" ".join(rng.choice(WORDS, size=8)) for _ in range(16)]  # 10 tokens each with [CLS]/[SEP]
    return {
        "train": write_csv(root / "train.csv", *keyword_dataset(24, seed=0)),
        "eval": write_csv(root / "eval.csv", *keyword_dataset(16, seed=1)),
        "lm": write_csv(root / "lm.csv", lm_texts),
        "fixed": write_csv(root / "fixed.csv", fixed, [LABELS[i % 2] for i in range(16)]),
    }


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


class CountingLower:
    """Wraps the runtime's lower-stack session and counts its calls."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


def counting_runtime(factory: pytest.TempPathFactory, name: str = SPLIT) -> tuple[BundleRuntime, CountingLower]:
    runtime = BundleRuntime(bundle(factory, name), threads=1)
    runtime.lower = counter = CountingLower(runtime.lower)
    return runtime, counter


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, list[str]]:
    """Run `edgeftl <argv> --quiet --json` in-process: (exit code, summary or None, stderr lines)."""
    capsys.readouterr()  # drop earlier output (a session bundle being built, say)
    rc = main([*argv, "--quiet", "--json"] if argv[:2] == ["device", "train"] else [*argv, "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err.splitlines()


def train_args(factory: pytest.TempPathFactory, name: str, data: Path, cache: Path, *extra: str) -> list[str]:
    return ["device", "train", "--bundle", str(bundle(factory, name)), "--data", str(data), "--batch", "8",
            "--lr", "0.02", "--threads", "1", "--cache-dir", str(cache), *extra]


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: equal digests mean an untouched folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def saved_params(state: Path, factory: pytest.TempPathFactory, name: str) -> np.ndarray:
    return load_state(state, bundle(factory, name)).params


# ---- 1. lower-stack cache -------------------------------------------------------------------


def test_cached_training_runs_the_lower_model_once_per_example_and_never_in_epochs(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], cache_dir: Path,
) -> None:
    # Prepare
    runtime, lower = counting_runtime(tmp_path_factory)
    examples = read_examples(data["train"], "classify", list(LABELS))
    config = TrainConfig(epochs=2, batch=8, lr=0.02)

    # Execute
    cache = open_or_build(runtime, examples, data["train"], cache_dir, progress=False)
    calls_to_build = lower.calls
    train(runtime, examples, config, progress=False, inputs=cache.inputs(runtime, examples))
    calls_in_training = lower.calls - calls_to_build
    reopened = open_or_build(runtime, examples, data["train"], cache_dir, progress=False)
    calls_to_reopen = lower.calls - calls_to_build - calls_in_training

    # Assert
    assert calls_to_build == len(examples)
    assert calls_in_training == 0
    assert calls_to_reopen == 0
    assert reopened.folder == cache.folder


def test_cached_training_gives_the_same_parameters_as_the_uncached_path(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], cache_dir: Path,
) -> None:
    # Prepare: whole padded batches of 8 on the uncached path, one example per cache entry on the other
    examples = read_examples(data["train"], "classify", list(LABELS))
    config = TrainConfig(epochs=2, batch=8, lr=0.02)
    cached_rt, _ = counting_runtime(tmp_path_factory)
    plain_rt, plain_lower = counting_runtime(tmp_path_factory)
    cache = open_or_build(cached_rt, examples, data["train"], cache_dir, progress=False)

    # Execute
    cached = train(cached_rt, examples, config, examples, progress=False,
                   inputs=cache.inputs(cached_rt, examples), eval_inputs=cache.inputs(cached_rt, examples))
    plain = train(plain_rt, examples, config, examples, progress=False)

    # Assert
    assert plain_lower.calls == 2 * len(examples) + len(examples)  # two epochs + the evaluation
    np.testing.assert_array_equal(cached_rt.get_flat(), plain_rt.get_flat())
    for key in ("first_loss", "last_loss", "eval_loss", "eval_accuracy"):
        assert cached[key] == plain[key], key


def test_an_examples_lower_features_do_not_depend_on_its_batch(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: three texts of different lengths, so the batch pads the shorter ones
    runtime, _ = counting_runtime(tmp_path_factory)
    ids, mask = runtime.encode(["market shares rose", "the match went to extra time after a late goal", "votes"])

    # Execute
    batched = runtime.features(ids, mask)
    alone = [runtime.features(ids[r:r + 1, :mask[r].sum()], mask[r:r + 1, :mask[r].sum()]) for r in range(3)]

    # Assert: batching changes nothing (the runtime runs the lower graph one example at a time)
    assert len(set(mask.sum(axis=1).tolist())) == 3
    for r in range(3):
        np.testing.assert_array_equal(batched[r, :mask[r].sum()], alone[r][0])
        assert not batched[r, mask[r].sum():].any()  # padded positions are zeros


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("file", "damage"), [(FEATURES, truncate), (FEATURES, flip_byte),
                                              (META, lambda p: p.write_text("{not json")),
                                              (FEATURES, lambda p: p.unlink())],
                         ids=["partial-features", "flipped-byte", "garbled-meta", "missing-file"])
def test_a_damaged_cache_entry_is_detected_and_recomputed(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], cache_dir: Path, file: str, damage,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    runtime, lower = counting_runtime(tmp_path_factory)
    examples = read_examples(data["train"], "classify", list(LABELS))
    first = open_or_build(runtime, examples, data["train"], cache_dir, progress=False)
    expected = [first.example(i)[0].copy() for i in range(len(examples))]
    first.close()
    damage(first.folder / file)

    # Execute
    again = open_or_build(runtime, examples, data["train"], cache_dir, progress=False)

    # Assert: rebuilt (one more lower call per example), same values, and the user was told once
    assert lower.calls == 2 * len(examples)
    for i, features in enumerate(expected):
        np.testing.assert_array_equal(again.example(i)[0], features)
    assert "recomputing" in capsys.readouterr().err


def test_cache_entries_are_keyed_by_bundle_and_data(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    manifest = BundleRuntime(bundle(tmp_path_factory, SPLIT), threads=1).manifest

    # Execute
    train_entry, _ = entry_folder(cache_dir, manifest, data["train"])
    eval_entry, _ = entry_folder(cache_dir, manifest, data["eval"])
    monkeypatch.setenv(CACHE_ENV, str(cache_dir / "from-env"))

    # Assert
    assert train_entry != eval_entry and train_entry.parent == eval_entry.parent == cache_dir
    assert train_entry == entry_folder(cache_dir, manifest, data["train"])[0]
    assert default_cache_dir() == cache_dir / "from-env"


# ---- 2. local state and resume --------------------------------------------------------------


@pytest.mark.parametrize(("name", "file"), [(SPLIT, "train"), ("llama-int8", "lm")])
def test_two_steps_restart_two_steps_equals_four_steps(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path], cache_dir: Path,
    capsys: pytest.CaptureFixture[str], name: str, file: str,
) -> None:
    # Prepare: 24 or 16 rows in batches of 8, so step 4 lies in the next epoch: the restart at
    # step 2 must restore the epoch's shuffle (RNG position) and AdamW's moments and step count.
    args = train_args(tmp_path_factory, name, data[file], cache_dir)

    # Execute
    straight = cli([*args, "--steps", "4", "--state", str(tmp_path / "a")], capsys)
    first_half = cli([*args, "--steps", "2", "--state", str(tmp_path / "b"), "--save-every", "1"], capsys)
    second_half = cli([*args, "--steps", "4", "--state", str(tmp_path / "b")], capsys)

    # Assert
    assert straight[0] == first_half[0] == second_half[0] == 0
    assert (first_half[1]["steps"], second_half[1]["steps"], second_half[1]["global_step"]) == (2, 2, 4)
    assert any("resuming" in line for line in second_half[2])
    np.testing.assert_array_equal(saved_params(tmp_path / "a", tmp_path_factory, name),
                                  saved_params(tmp_path / "b", tmp_path_factory, name))
    assert second_half[1]["last_loss"] == straight[1]["last_loss"]


def test_a_failed_save_leaves_the_previous_state_intact(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    import edgeftl.device.state as state_module

    runtime = BundleRuntime(bundle(tmp_path_factory, "bert-int8"), threads=1)
    state = tmp_path / "state"
    save_state(state, runtime, Progress(step=1), {"seed": 0})
    before = tree_digest(state)
    runtime.set_flat(runtime.get_flat() + 1.0)

    def disk_full(path, **arrays) -> None:  # the optimizer state half written, then ENOSPC
        Path(path).write_bytes(b"half an optimizer state")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module.np, "savez", disk_full)

    # Execute
    with pytest.raises(OSError, match="No space"):
        save_state(state, runtime, Progress(step=2), {"seed": 0})

    # Assert
    assert tree_digest(state) == before
    assert load_state(state, bundle(tmp_path_factory, "bert-int8")).progress.step == 1


@pytest.mark.parametrize(("name", "extra", "words"), [
    ("bert-int8", [], ["another bundle", "new --state"]),
    (SPLIT, ["--seed", "1"], ["seed=0", "same values"]),
], ids=["other-bundle", "other-seed"])
def test_a_state_that_does_not_fit_the_run_is_refused_and_left_intact(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path], cache_dir: Path,
    capsys: pytest.CaptureFixture[str], name: str, extra: list[str], words: list[str],
) -> None:
    # Prepare: a state saved by training the split bundle for one step
    state = tmp_path / "state"
    assert cli([*train_args(tmp_path_factory, SPLIT, data["train"], cache_dir), "--steps", "1",
                "--state", str(state)], capsys)[0] == 0
    before = tree_digest(state)

    # Execute
    rc, _, err = cli([*train_args(tmp_path_factory, name, data["train"], cache_dir), "--steps", "2",
                      "--state", str(state), *extra], capsys)

    # Assert
    assert rc == 2 and len(err) == 1 and err[0].startswith("edgeftl: error: ")
    assert all(word in err[0] for word in words), err[0]
    assert tree_digest(state) == before
    with pytest.raises(StateError):
        load_state(state, bundle(tmp_path_factory, "bert-int8"))


# ---- 3. validation split, 4. measurement, 8. summary ----------------------------------------


def test_val_fraction_holds_out_a_seeded_split_and_reports_eval_in_the_summary(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path], cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    args = [*train_args(tmp_path_factory, SPLIT, data["train"], cache_dir), "--epochs", "1", "--val-fraction", "0.25"]

    # Execute
    rc, summary, _ = cli(args, capsys)
    again = cli(args, capsys)[1]
    both = cli([*args, "--eval", str(data["eval"])], capsys)

    # Assert: 24 rows -> 18 train (3 batches of 8, 8, 2) + 6 validation, the same split each time
    assert rc == 0
    assert (summary["eval_samples"], summary["samples"], summary["steps"]) == (6, 18, 3)
    assert 0 <= summary["eval_accuracy"] <= 1 and summary["eval_loss"] > 0
    assert (again["eval_loss"], again["eval_accuracy"]) == (summary["eval_loss"], summary["eval_accuracy"])
    for key in ("first_loss", "last_loss", "peak_rss_mib", "median_step_time_s"):
        assert summary[key] is not None, key
    assert both[0] == 2 and both[2] == ["edgeftl: error: give --eval or --val-fraction, not both"]


def test_metrics_are_a_flat_dict_with_units_appended_as_json_lines(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path], cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    metrics = tmp_path / "runs" / "metrics.jsonl"
    folder = bundle(tmp_path_factory, SPLIT)
    # No evaluation in this run: the eval graph is never opened.
    opened = ["params.safetensors", "training_model.onnx", "tokenizer.json", "lower_model.onnx"]
    args = [*train_args(tmp_path_factory, SPLIT, data["train"], cache_dir), "--steps", "2", "--metrics", str(metrics)]

    # Execute
    summaries = [cli(args, capsys)[1] for _ in range(2)]
    lines = metrics.read_text().splitlines()

    # Assert
    assert [json.loads(line) for line in lines] == summaries
    record = summaries[0]
    assert all(not isinstance(v, (dict, list)) for v in record.values())
    assert record["model_bytes_loaded"] == sum((folder / name).stat().st_size for name in opened)
    assert 0 < record["rss_after_load_mib"] <= record["peak_rss_mib"]
    assert record["median_step_time_s"] > 0 and record["samples_per_s"] > 0
    assert record["platform_cpu_count"] >= 1 and record["platform_total_memory_mib"] > 0
    assert {"platform_machine", "platform_system"} <= set(record)


def test_measurement_helpers_read_the_os() -> None:
    # Execute
    record = run_metrics([0.2, 0.1, 0.4], samples=24, rss_after_load=50.0, model_bytes_loaded=10)
    info = platform_info()

    # Assert: hand-computed median and throughput
    assert record["median_step_time_s"] == 0.2
    assert record["samples_per_s"] == pytest.approx(24 / 0.7, abs=0.01)
    assert run_metrics([], 0, None, None)["median_step_time_s"] is None
    if sys.platform == "linux":
        assert proc_status_mib("VmRSS") > 0 and proc_status_mib("VmHWM") >= proc_status_mib("VmRSS") - 1
    assert set(info) >= {"platform_machine", "platform_system", "platform_cpu_count", "platform_total_memory_mib"}


def test_append_jsonl_appends_sorted_lines(tmp_path: Path) -> None:
    # Execute
    append_jsonl(tmp_path / "m.jsonl", {"b": 1, "a": 2})
    append_jsonl(tmp_path / "m.jsonl", {"c": 3})

    # Assert
    assert (tmp_path / "m.jsonl").read_text() == '{"a": 2, "b": 1}\n{"c": 3}\n'


# ---- 5. memory plan, 6. --max-memory-mib ----------------------------------------------------


def test_memory_plan_extrapolates_linearly_and_finds_the_largest_fitting_micro_batch() -> None:
    # Prepare: peak 100 MiB at micro-batch 1, 110 at 2 -> 10 MiB per sample
    plan = MemoryPlan(seq=64, rss_after_load_mib=80.0, peaks_mib={1: 100.0, 2: 110.0})
    noisy = MemoryPlan(seq=64, rss_after_load_mib=80.0, peaks_mib={1: 100.0, 2: 99.5})

    # Execute / Assert
    assert plan.peak_mib(5) == 140.0
    assert plan.largest_fitting(135.0, batch=16) == 4  # 100 + 3 * 10 = 130 <= 135 < 140
    assert plan.largest_fitting(1000.0, batch=16) == 16
    assert plan.largest_fitting(99.0, batch=16) == 0
    assert noisy.peak_mib(8) == 100.0 and noisy.largest_fitting(100.0, batch=8) == 8
    assert fit_micro_batch(plan, 16, 4, 135.0) == (4, None)
    micro, note = fit_micro_batch(plan, 16, None, 135.0)
    assert micro == 4 and "micro-batch 4" in note and "instead of 16" in note
    with pytest.raises(MemoryLimitError, match=r"100.0 MiB at micro-batch 1 .* exceeds --max-memory-mib 99"):
        fit_micro_batch(plan, 16, None, 99.0)
    # The training process holds 5 or 6 MiB more than a probe: 100 + 5 + 3 * 10 = 135 fits, 136 does not.
    assert fit_micro_batch(plan, 16, None, 135.0, extra_mib=5.0)[0] == 4
    assert fit_micro_batch(plan, 16, None, 135.0, extra_mib=6.0)[0] == 3


def test_memory_plan_interpolates_between_measured_micro_batches_and_respects_a_failed_probe() -> None:
    # Prepare: peaks grow faster than linearly (as measured on MiniLM): 100, 110, then 290 at 16
    plan = MemoryPlan(seq=64, rss_after_load_mib=80.0, peaks_mib={16: 290.0, 1: 100.0, 2: 110.0})
    failed = MemoryPlan(seq=64, rss_after_load_mib=80.0, peaks_mib={1: 100.0, 2: 110.0}, fails_from=16)

    # Execute / Assert: exact at measured points, on the line between them, last slope beyond
    assert plan.peak_mib(16) == 290.0 and plan.peak_mib(2) == 110.0
    assert plan.peak_mib(9) == 110.0 + 7 * (180.0 / 14)  # 200.0
    assert plan.per_sample_mib == pytest.approx(180.0 / 14)
    assert plan.peak_mib(18) == pytest.approx(290.0 + 2 * 180.0 / 14, abs=0.1)
    assert plan.largest_fitting(200.0, batch=16) == 9
    # A probe at 16 that failed: 16 never fits, whatever the line through 1 and 2 says.
    assert failed.largest_fitting(1000.0, batch=16) == 15
    assert failed.report(16, None, 1000.0)["probe_failed_at_micro_batch"] == 16


def test_measure_plan_probes_1_2_and_the_asked_micro_batch_and_stops_at_a_failure(tmp_path: Path) -> None:
    # Prepare: a fake probe; micro-batch 16 "gets killed"
    asked: list[int] = []

    def run_probe(bundle: Path, micro_batch: int, seq: int, threads: int | None) -> Probe:
        asked.append(micro_batch)
        if micro_batch == 16:
            raise RuntimeError("memory probe (micro-batch 16, sequence 64) failed: Killed")
        return Probe(micro_batch, seq, 80.0, 100.0 + 10 * (micro_batch - 1))

    # Execute
    fitting = measure_plan(tmp_path, 64, run_probe=run_probe, micro_batch=8)
    killed = measure_plan(tmp_path, 64, run_probe=run_probe, micro_batch=16)

    # Assert
    assert asked == [1, 2, 8, 1, 2, 16]
    assert fitting.peaks_mib == {1: 100.0, 2: 110.0, 8: 170.0} and fitting.fails_from is None
    assert killed.peaks_mib == {1: 100.0, 2: 110.0} and killed.fails_from == 16


def test_measure_plan_does_not_probe_a_micro_batch_already_estimated_over_the_limit(tmp_path: Path) -> None:
    # Prepare: peaks 100 + 10 per sample; at micro-batch 16 the line from 1 and 2 says 250 MiB
    asked: list[int] = []

    def run_probe(bundle: Path, micro_batch: int, seq: int, threads: int | None) -> Probe:
        asked.append(micro_batch)
        return Probe(micro_batch, seq, 80.0, 100.0 + 10 * (micro_batch - 1))

    # Execute: a 200 MiB limit, then a 300 MiB one
    skipped = measure_plan(tmp_path, 64, run_probe=run_probe, micro_batch=16, limit_mib=200)
    probed = measure_plan(tmp_path, 64, run_probe=run_probe, micro_batch=16, limit_mib=300)

    # Assert: 16 was not run under 200 MiB; the report says so and still estimates its peak
    assert asked == [1, 2, 1, 2, 16]
    assert skipped.skipped_from == 16 and skipped.fails_from is None and 16 not in skipped.peaks_mib
    report = skipped.report(16, None, 200)
    assert report["probe_skipped_at_micro_batch"] == 16 and report["estimated_peak_mib"] == 250.0
    assert report["largest_fitting_micro_batch"] == 11  # 100 + 10 * 10 = 200
    assert probed.skipped_from is None and probed.peaks_mib[16] == 250.0


def test_plan_estimate_is_in_the_range_of_a_measured_training_step(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: every text is 10 tokens, so the real run trains at exactly the planned shape
    folder = bundle(tmp_path_factory, "bert-int8")
    real_cmd = [sys.executable, "-m", "edgeftl.device.cli", "device", "train", "--bundle", str(folder),
                "--data", str(data["fixed"]), "--steps", "1", "--batch", "8", "--threads", "1", "--quiet", "--json",
                "--cache-dir", str(tmp_path / "cache")]

    # Execute
    rc, plan, _ = cli(["device", "plan", "--bundle", str(folder), "--batch", "8", "--seq", "10",
                       "--threads", "1", "--max-memory-mib", "4096"], capsys)
    real = subprocess.run(real_cmd, capture_output=True, text=True, check=True)
    measured = json.loads(real.stdout.splitlines()[-1])

    # Assert: the tiny model's fixed part (interpreter, ORT, sessions) dominates; within 30%
    assert rc == 0
    assert plan["peak_1_mib"] >= plan["rss_after_load_mib"] > 0
    assert plan["largest_fitting_micro_batch"] == 8
    assert 0.7 * measured["peak_rss_mib"] <= plan["estimated_peak_mib"] <= 1.3 * measured["peak_rss_mib"]
    assert 0.7 * measured["rss_after_load_mib"] <= plan["rss_after_load_mib"] <= 1.3 * measured["rss_after_load_mib"]


def test_max_memory_picks_a_smaller_micro_batch_when_the_batch_does_not_fit(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], cache_dir: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: stand-ins for the probe processes (a process boundary) and for this process's RSS
    # reading: 80 MiB after loading in both, peak 100 MiB + 10 MiB per sample.
    import edgeftl.device.plan as plan_module
    import edgeftl.device.train as train_module

    seen = []

    def fake_probe(bundle_dir: Path, micro_batch: int, seq: int, threads: int | None) -> Probe:
        seen.append((micro_batch, seq))
        return Probe(micro_batch, seq, 80.0, 100.0 + 10.0 * (micro_batch - 1))

    monkeypatch.setattr(plan_module, "probe", fake_probe)
    monkeypatch.setattr(train_module, "rss_mib", lambda: 80.0)
    args = [*train_args(tmp_path_factory, SPLIT, data["train"], cache_dir), "--steps", "1", "--max-memory-mib", "135"]

    # Execute
    rc, summary, err = cli(args, capsys)

    # Assert: micro-batch 4 (estimated 130 MiB) instead of 8 (170 MiB), said in one info line;
    # probes at 1 and 2 at the data's longest sequence, none at 8: its estimate is already over the limit
    examples = read_examples(data["train"], "classify", list(LABELS))
    longest = max(len(e.text.split()) for e in examples) + 2  # [CLS] [SEP]
    assert rc == 0 and summary["micro_batch"] == 4
    assert seen == [(1, longest), (2, longest)]
    assert [line for line in err if "micro-batch 4" in line and "instead of 8" in line]


# ---- 7. bad input: one line, exit 2, the saved state untouched ------------------------------


def _drop_params(folder: Path, files: dict[str, Path]) -> None:
    (folder / "params.safetensors").unlink()


def _flip_tokenizer(folder: Path, files: dict[str, Path]) -> None:
    flip_byte(folder / "tokenizer.json")


def _bump_format(folder: Path, files: dict[str, Path]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format_version"] = 99
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _data_file(text: bytes):
    def write(folder: Path, files: dict[str, Path]) -> None:
        files["data"].write_bytes(text)
    return write


BAD_INPUTS = [
    pytest.param(_drop_params, [], ["'params.safetensors'", "missing"], id="bundle-file-missing"),
    pytest.param(_flip_tokenizer, [], ["tokenizer.json", "sha256"], id="bundle-file-sha256"),
    pytest.param(_bump_format, [], ["format_version 99"], id="unknown-format-version"),
    pytest.param(_data_file(b""), [], ["file is empty"], id="data-empty"),
    pytest.param(_data_file(b"text,label\nthe market,pos\nthe film \xff,neg\n"), [], ["line 3", "not UTF-8"],
                 id="data-not-utf8"),
    pytest.param(_data_file(b"text\nthe market\n"), [], ["line 1", "'label'"], id="data-missing-column"),
    pytest.param(_data_file(b"text,label\nthe market,pos\nthe film,neutral\n"), [], ["line 3", "'neutral'"],
                 id="data-unknown-label"),
    pytest.param(None, ["--max-memory-mib", "1"], ["estimated peak memory", "--max-memory-mib 1"],
                 id="batch-exceeds-memory"),
]


@pytest.mark.parametrize(("damage", "extra", "words"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_leaves_the_state_intact(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path], cache_dir: Path,
    capsys: pytest.CaptureFixture[str], damage, extra: list[str], words: list[str],
) -> None:
    # Prepare: a state saved by a good run, then a copy of the bundle and the data to break
    folder = tmp_path / "bundle"
    shutil.copytree(bundle(tmp_path_factory, "bert-int8"), folder)
    files = {"data": shutil.copy(data["train"], tmp_path / "data.csv")}
    state = tmp_path / "state"
    good = ["device", "train", "--bundle", str(folder), "--data", str(files["data"]), "--batch", "8",
            "--threads", "1", "--cache-dir", str(cache_dir), "--state", str(state)]
    assert cli([*good, "--steps", "1"], capsys)[0] == 0
    before = tree_digest(state)
    if damage:
        damage(folder, files)

    # Execute
    rc, _, err = cli([*good, "--steps", "3", *extra], capsys)

    # Assert
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("edgeftl: error: "), err
    assert all(word in err[0] for word in words), err[0]
    assert tree_digest(state) == before


# ---- 9. micro-batching is exact -------------------------------------------------------------


@pytest.mark.parametrize(("name", "file", "task"), [("bert-int8", "train", "classify"),
                                                    ("llama-int8", "lm", "causal-lm")])
def test_one_step_as_micro_batches_of_2_equals_one_pass_of_8(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], name: str, file: str, task: str,
) -> None:
    # Prepare: 8 examples; the LM texts have different lengths, so each micro-batch must be
    # weighted by its share of predicted tokens, not of samples.
    examples = read_examples(data[file], task, list(LABELS) if task == "classify" else None)[:8]
    results = {}

    # Execute
    for micro in (8, 2):
        runtime = BundleRuntime(bundle(tmp_path_factory, name), threads=1)
        runtime.set_learning_rate(1e-2)
        before = runtime.get_flat()
        loss = accumulate_batch(runtime, examples, micro, 1.0)
        runtime.apply_step()
        results[micro] = (loss, runtime.get_flat(), before)

    # Assert
    if task == "causal-lm":
        assert len({len(e.text.split()) for e in examples}) > 2
    (loss8, after8, before8), (loss2, after2, before2) = results[8], results[2]
    np.testing.assert_array_equal(before8, before2)
    assert loss2 == pytest.approx(loss8, rel=1e-5)
    step = np.linalg.norm(after8 - before8)
    assert step > 0
    assert np.linalg.norm(after2 - after8) <= 1e-5 * np.linalg.norm(after8)
    assert np.linalg.norm(after2 - after8) <= 1e-4 * step


# ---- the new modules stay torch-free ---------------------------------------------------------


def test_cached_split_training_with_state_and_metrics_never_imports_torch(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, data: dict[str, Path],
) -> None:
    # Prepare
    from test_device_runtime import TORCH_FREE_CHILD

    argv = [*train_args(tmp_path_factory, SPLIT, data["train"], tmp_path / "cache"), "--epochs", "2",
            "--val-fraction", "0.25", "--state", str(tmp_path / "state"), "--metrics", str(tmp_path / "m.jsonl"),
            "--json", "--quiet"]

    # Execute
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_CHILD, *argv], capture_output=True, text=True,
                          cwd=tmp_path)

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["rc"] == 0 and result["loaded"] == []
    assert result["summary"]["steps"] == 6 and (tmp_path / "m.jsonl").is_file()


def test_a_state_saved_by_the_training_build_runtime_is_refused_untouched(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
) -> None:
    # Prepare: a format 1 state (ORT checkpoint + params.npy), as devices saved before moving to stock onnxruntime
    folder = bundle(tmp_path_factory, "bert-int8")
    state = tmp_path / "state"
    version = state / "step-000000004"
    version.mkdir(parents=True)
    (state / "CURRENT").write_text(version.name + "\n")
    (version / "checkpoint").write_bytes(b"ORT checkpoint bytes")
    np.save(version / "params.npy", np.zeros(4, np.float32))
    (version / "state.json").write_text(json.dumps({"format_version": 1, "progress": {"step": 4}}))
    before = tree_digest(state)

    # Execute
    with pytest.raises(StateError) as caught:
        load_state(state, folder)

    # Assert
    message = str(caught.value)
    assert "format_version 1" in message and "new --state folder" in message and "\n" not in message
    assert tree_digest(state) == before
