"""`edgeftl report`: numbers, files, bad run folders, and the HTML as a browser shows it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeftl.coordinator.report import ReportError, load_run, write_report
from edgeftl.coordinator.report.summary import fmt_bytes, platform_label, totals
from edgeftl.device.cli import main

from conftest import in_ci

TRAINABLE = 1000  # fp32 update = 4,000 bytes
FIGURES = 6


def _device(train_time_s: float, peak: float) -> dict:
    # As device/agent.py sends them (platform keys prefixed twice, as the agent did at format 1).
    return {"samples": 48, "first_loss": 1.6, "last_loss": 1.5, "train_time_s": train_time_s, "peak_rss_mib": peak,
            "rss_mib": peak, "bytes_down": 4200, "update_bytes": 380, "platform_platform_machine": "aarch64",
            "platform_platform_system": "Linux", "platform_platform_release": "5.15.0-tegra",
            "platform_platform_cpu_count": 6, "platform_platform_total_memory_mib": 7620.0}


def _record(round_index: int, accuracy: float, devices: int = 2) -> dict:
    """One round as the coordinator writes it: every update 400 bytes on the wire."""
    per_device = {f"dev{i:02d}": _device(2.0 + i + round_index, 300.0 + 10 * i) for i in range(devices)}
    return {"format": 1, "round": round_index, "devices_online": devices, "devices_selected": devices,
            "updates_received": devices, "updates_late": 0, "updates_rejected": 0, "rejected_reasons": {},
            "aggregated": True, "bytes_up": 400 * devices, "bytes_down": 4200 * devices, "bytes_published": 9000,
            "device_peak_rss_mib": max(d["peak_rss_mib"] for d in per_device.values()), "devices": per_device,
            "wall_s": 3.0, "accuracy": accuracy, "loss": 1.6 - accuracy}


def _config(codec: str) -> dict:
    """config.json as `edgeftl simulate` writes it: every setting a string."""
    return {"bundle": {"model_id": "tiny/bert", "quantization": "int8", "trainable_params": TRAINABLE,
                       "adapter": {"kind": "lora", "rank": 8, "alpha": 16.0, "targets": ["query", "value"],
                                   "train_layers": None}},
            "rounds": {"codec": codec, "rounds": "3", "steps": "3", "epochs": "None", "batch": "16", "lr": "0.002",
                       "deadline_s": "300.0", "downlink": "none", "strategy": "fedavg"},
            "simulation": {"devices": "2", "alpha": "0.5"}}


def _run(folder: Path, codec: str = "int8", rounds: int = 3, tail: str = "") -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(_record(r, 0.5 + 0.1 * r), sort_keys=True) + "\n" for r in range(rounds)]
    (folder / "metrics.jsonl").write_text("".join(lines) + tail)
    (folder / "config.json").write_text(json.dumps(_config(codec), indent=2))
    return folder


def test_totals_compare_the_wire_bytes_with_fp32(tmp_path):
    # Prepare: 3 rounds x 2 updates of 400 bytes; fp32 would be 4 x 1000 bytes each
    run = load_run(_run(tmp_path / "a"))
    # Execute
    t = totals(run)
    # Assert (by hand: 6 updates, 2,400 bytes up, 24,000 fp32 -> 10x)
    assert t["updates"] == 6 and t["bytes_up"] == 2400 and t["fp32_bytes_up"] == 24000
    assert t["compression_ratio"] == pytest.approx(10.0)
    assert t["final_accuracy"] == pytest.approx(0.7) and t["max_device_peak_rss_mib"] == 310.0
    assert run.setting("rounds", "lr") == 0.002 and run.setting("rounds", "epochs") is None
    assert run.label == "a (int8)"


def test_platform_keys_are_read_however_often_the_agent_prefixed_them(tmp_path):
    run = load_run(_run(tmp_path / "a"))
    metrics = run.records[0]["devices"]["dev00"]
    assert metrics["platform_machine"] == "aarch64"
    assert platform_label(metrics) == "aarch64 Linux 5.15.0, 6 CPUs, 7.4 GiB"


def test_fmt_bytes_uses_binary_units():
    assert [fmt_bytes(v) for v in (512, 1536, 3 * 2**20, 1024**3)] == ["512 B", "1.5 KiB", "3 MiB", "1 GiB"]


def test_report_is_one_self_contained_html_with_its_pngs_beside_it(tmp_path, capsys):
    # Prepare
    folder = _run(tmp_path / "run")
    # Execute
    rc = main(["report", str(folder), "--budget-mib", "512"])
    # Assert
    assert rc == 0
    html = (folder / "report.html").read_text()
    assert capsys.readouterr().out.strip() == str(folder / "report.html")
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,", html)) == FIGURES
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html), "the report must not fetch anything"
    assert len(list(folder.glob("report-*.png"))) == FIGURES
    for text in ("10.0x less than fp32", "70.0%", "tiny/bert", "lora r=8 alpha=16.0 on query, value", "int8",
                 "aarch64 Linux 5.15.0, 6 CPUs, 7.4 GiB", "2.34 KiB",
                 # final 70% first reached after round 2: 3 rounds, 3 x 800 B up, 3 x 8,400 B down
                 "3 rounds, 2.34 KiB up / 24.6 KiB down"):
        assert text in html, text


def test_two_runs_with_different_codecs_overlay_in_one_report(tmp_path):
    # Prepare
    a, b = _run(tmp_path / "fp16-run", codec="fp16"), _run(tmp_path / "topk-run", codec="topk:0.01+int8", rounds=2)
    # Execute
    report = write_report([a, b])
    # Assert: default output beside the first run, both runs named with their codec
    assert report.html == a / "report-compare.html"
    html = report.html.read_text()
    assert "fp16-run (fp16)" in html and "topk-run (topk:0.01+int8)" in html
    assert html.count("data:image/png;base64,") == FIGURES
    assert not (a / "report.html").exists()
    assert "Held-out accuracy against bytes sent" in html and (a / "report-compare-accuracy-bytes.png").is_file()


def test_truncated_last_line_reports_the_complete_rounds_with_a_warning(tmp_path, capsys):
    # Prepare: the coordinator was killed while writing round 3
    cut = json.dumps(_record(3, 0.9), sort_keys=True)[:150]
    folder = _run(tmp_path / "killed", tail=cut)
    # Execute
    rc = main(["report", str(folder)])
    # Assert
    err = capsys.readouterr().err
    assert rc == 0
    assert "edgeftl: warning: skipped truncated last line 4" in err and "metrics.jsonl" in err
    run = load_run(folder)
    assert [r["round"] for r in run.records] == [0, 1, 2]
    assert "skipped truncated last line 4" in (folder / "report.html").read_text()


def test_record_appended_after_a_cut_line_is_kept(tmp_path):
    # Prepare: killed mid-line, then resumed: round 3's record starts on the cut line
    cut = json.dumps(_record(2, 0.9), sort_keys=True)[:100]
    folder = _run(tmp_path / "resumed", rounds=2, tail=cut + json.dumps(_record(2, 0.8), sort_keys=True) + "\n")
    # Execute
    run = load_run(folder)
    # Assert
    assert [r["round"] for r in run.records] == [0, 1, 2] and run.records[2]["accuracy"] == 0.8
    assert run.warnings == [f"skipped a truncated record on line 3 of {folder / 'metrics.jsonl'} (100 bytes, "
                            "not complete JSON)"]


def test_unknown_metrics_format_is_one_clear_error(tmp_path, capsys):
    # Prepare
    folder = _run(tmp_path / "future", rounds=1)
    record = _record(1, 0.6) | {"format": 2}
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    # Execute
    rc = main(["report", str(folder)])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"edgeftl: error: {folder / 'metrics.jsonl'} line 2: unknown metrics format 2; "
                   "this edgeftl reads format 1"]
    assert not (folder / "report.html").exists()


@pytest.mark.parametrize("case", ["missing", "no-metrics", "empty", "only-a-cut-line"])
def test_run_folders_that_hold_no_round_are_errors_naming_them(tmp_path, capsys, case):
    # Prepare
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "empty":
        (folder / "metrics.jsonl").write_text("")
    if case == "only-a-cut-line":
        (folder / "metrics.jsonl").write_text('{"accuracy": 0.4, "aggr')
    # Execute
    rc = main(["report", str(folder)])
    # Assert
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("edgeftl: error: ") and str(folder) in err
    with pytest.raises(ReportError):
        load_run(folder)


# ---- in a browser ---------------------------------------------------------------------------------
PROBE = ("<script>addEventListener('load', () => { const ok = [...document.images].filter("
         "i => i.complete && i.naturalWidth > 0).length; document.body.setAttribute('data-images-loaded', ok); "
         "document.title = 'images loaded: ' + ok; });</script></body>")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if in_ci():
            pytest.fail("chromium is not installed (make chromium installs it)")
        pytest.skip("chromium is not installed: sudo apt-get install -y chromium (or make chromium)")
    return found


def _images_loaded(browser: str, html: Path, profile: Path) -> int:
    """Open `html` in headless Chromium (offline profile) and count the images it decoded."""
    probe = html.with_name("probe-" + html.name)
    probe.write_text(html.read_text().replace("</body>", PROBE))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'data-images-loaded="(\d+)"', dom)
    assert found, f"the probe did not run; DOM starts: {dom[:300]!r}"
    return int(found.group(1))


def test_headless_chromium_shows_every_plot(tmp_path):
    # Prepare: a two-run report, and a copy with one image's bytes broken (the probe must see it)
    browser = _chromium()
    report = write_report([_run(tmp_path / "a", codec="int8"), _run(tmp_path / "b", codec="fp16")],
                          out=tmp_path / "out" / "report.html", budget_mib=400)
    broken = tmp_path / "broken" / "report.html"
    broken.parent.mkdir()
    broken.write_text(report.html.read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    # Execute
    loaded = _images_loaded(browser, report.html, tmp_path / "profile")
    loaded_broken = _images_loaded(browser, broken, tmp_path / "profile")
    # Assert
    assert loaded == FIGURES == len(report.images)
    assert loaded_broken == FIGURES - 1


# ---- tools/bench.py ----------------------------------------------------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench as bench_cli
import benchsuite as bench


def test_bench_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
    # Prepare: a checkout with two of the four scripts
    (tmp_path / "tools").mkdir()
    for script in ("bench_build.py", "bench_federation.py"):
        (tmp_path / "tools" / script).write_text("raise SystemExit('must not run')\n")
    # Execute
    rc = bench_cli.main(["--quick", "--dry-run", "--only", "federation,device", "--root", str(tmp_path)])
    # Assert
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].startswith("federation: (cd ") and out[0].endswith(
        "bench_federation.py --devices 3 --rounds 3 --steps 3 --max-per-device 48 --codecs none,topk:0.02+int4)")
    assert out[1] == "device: skipped: tools/bench_device.py not found"
    assert not (tmp_path / "docs").exists()


def test_bench_rejects_unknown_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--only", "build,gpu", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "accepted names are build, device, device_llm, federation, coordinator" in capsys.readouterr().err


def test_bench_header_is_rewritten_and_every_section_kept(tmp_path):
    # Prepare: a BENCHMARKS.md as the scripts leave it, and the coordinator benchmark's JSON
    docs = tmp_path / "docs"
    docs.mkdir()
    sections = ("<!-- bench_build:start -->\n## Build\n| a |\n<!-- bench_build:end -->\n\nnotes by hand\n\n"
                "<!-- bench_coordinator:start -->\n## Coordinator\n<!-- bench_coordinator:end -->\n")
    (docs / "BENCHMARKS.md").write_text("# Benchmarks\n\nMachine: old line\n\n" + sections)
    (docs / "bench_coordinator.json").write_text(json.dumps(
        [{"codec": "none", "updates": 1000, "decode_s": 1.5, "fedavg_s": 0.5},
         {"codec": "int8:256", "updates": 1000, "decode_s": 0.5, "fedavg_s": 0.25}]))
    outcomes = [bench.Outcome("coordinator", ["python", "tools/bench_coordinator.py"], 0, 12.0,
                              docs / "bench_coordinator.json", True),
                bench.Outcome("device", [], None, 0.0, docs / "bench_device.json", False)]
    machine = bench.machine()
    # Execute: twice, as two runs of `edgeftl bench` would
    for _ in range(2):
        summary, table = bench.summarise(tmp_path, outcomes, True, machine)
        bench.write_docs(tmp_path, summary, table)
    # Assert
    text = (docs / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks\n\n" + bench.machine_line(machine) + "\n\n" + bench.START)
    assert text.count(bench.START) == 1 and text.count("Machine: ") == 1
    assert text.endswith("\n\n" + sections)
    assert "| coordinator | decode + aggregate N updates | 1000 updates decode + FedAvg in <= 2.00 s (slowest " \
           "codec none) | ok | 12 | `docs/bench_coordinator.json` |" in text
    assert "| device | device training memory and step time | - | skipped (no script) | 0 | - |" in text
    saved = json.loads((docs / "bench_summary.json").read_text())
    assert saved["quick"] is True and saved["machine"]["cores"] == os.cpu_count()
    assert [b["name"] for b in saved["benchmarks"]] == ["coordinator", "device"]


def test_a_coordinator_run_without_config_or_evaluation_still_reports(tmp_path):
    # Prepare: `edgeftl coordinator` without --eval writes no accuracy, and no config.json
    folder = tmp_path / "gateway"
    folder.mkdir()
    records = [{k: v for k, v in _record(r, 0.0).items() if k not in ("accuracy", "loss")} for r in range(2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Execute
    report = write_report([folder])
    # Assert
    html = report.html.read_text()
    assert html.count("data:image/png;base64,") == FIGURES
    assert "- (no config.json)" in html and "gateway (?)" in html


def test_what_the_record_writer_appends_is_what_reports_read(tmp_path):
    from edgeftl.coordinator.rounds import records

    # Prepare / Execute: two rounds through the one writer of run records
    folder = tmp_path / "run"
    for round_index in range(2):
        records.append(folder, _record(round_index, 0.5 + 0.1 * round_index))
    run = load_run(folder)
    # Assert: sorted JSON lines, read back whole; a fresh run drops them
    lines = (folder / records.METRICS).read_text().splitlines()
    assert lines[0] == json.dumps(_record(0, 0.5), sort_keys=True)
    assert [r["round"] for r in run.records] == [0, 1] and not run.warnings
    records.start_fresh(folder)
    assert not (folder / records.METRICS).exists()


def test_the_coordinator_benchmark_runs_from_the_checkout():
    # A small run of tools/bench_coordinator.py: it drives the link's decode and the inbox, which
    # change with the protocol; the numbers themselves are the benchmark's business, not a test's.
    script = Path(__file__).resolve().parents[1] / "tools" / "bench_coordinator.py"
    done = subprocess.run([sys.executable, str(script), "--updates", "20", "--repeats", "1", "--no-write"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| topk:0.01+int8:256 | 20 |" in done.stdout


def test_device_supplied_garbage_in_records_never_breaks_the_report(tmp_path, capsys):
    # Prepare: a record as a hostile device (or a hand edit) might leave it: strings, lists and huge
    # numbers where numbers go, in the record and in a device's metrics
    folder = _run(tmp_path / "run", rounds=2)
    bad = _record(2, 0.8)
    bad.update(bytes_down="lots", device_peak_rss_mib=[1, 2], updates_received=10**400, accuracy="high")
    bad["devices"]["dev00"].update(peak_rss_mib="300", train_time_s=[1], bytes_down=10**400, note="x" * 5000)
    with (folder / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(bad, sort_keys=True) + "\n")
    # Execute
    run = load_run(folder)
    t = totals(run)
    rc = main(["report", str(folder), "--budget-mib", "512"])
    # Assert: the bad values are treated as missing, the rest of the round is kept
    assert rc == 0 and len(run.records) == 3
    last = run.records[-1]
    assert last["bytes_down"] == 0 and last["updates_received"] == 0 and "accuracy" not in last
    assert {"peak_rss_mib", "train_time_s", "bytes_down", "note"}.isdisjoint(last["devices"]["dev00"])
    assert t["final_accuracy"] == pytest.approx(0.6)


def test_a_language_model_run_plots_perplexity_against_bytes(tmp_path):
    # Prepare: a causal-LM run's records carry perplexity, not accuracy
    folder = _run(tmp_path / "lm")
    lines = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["perplexity"] = 60.0 - 5 * record.pop("accuracy") * 10
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # Execute
    report = write_report([folder])
    # Assert
    html = report.html.read_text()
    assert "Held-out perplexity against bytes sent" in html and (folder / "report-accuracy-bytes.png").is_file()
    assert html.count("data:image/png;base64,") == FIGURES
