"""The benchmark suite behind tools/bench.py: run the scripts of tools/, gather their JSON, summarise them.

Each script stays the owner of its numbers: it writes docs/bench_<name>.json and rewrites its
own marked section of docs/BENCHMARKS.md. This module only runs them one after another, reads
what they wrote, and rewrites the document's header: the machine line and a summary table
between `<!-- bench_summary:start -->` and `<!-- bench_summary:end -->`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgeftl.device.measure import platform_info

import benchdoc  # tools/ is on sys.path: this module is imported by tools/bench.py and the tests

START, END = "<!-- bench_summary:start -->", "<!-- bench_summary:end -->"


@dataclass(frozen=True)
class Benchmark:
    script: str  # under tools/
    quick: tuple[str, ...]  # flags for a few-minute run
    what: str


BENCHMARKS = {
    "build": Benchmark("bench_build.py", ("--quick",), "bundle size, build time, fidelity"),
    "device": Benchmark("bench_device.py", ("--quick",), "device training memory and step time"),
    "device_llm": Benchmark("bench_device_llm.py", ("--quick",), "LLM (SmolLM2) device training vs PyTorch + PEFT"),
    "federation": Benchmark("bench_federation.py", ("--devices", "3", "--rounds", "3", "--steps", "3",
                                                    "--max-per-device", "48", "--codecs", "none,topk:0.02+int4"),
                            "federated vs centralized LoRA, codec sweep"),
    "coordinator": Benchmark("bench_coordinator.py", ("--quick",), "decode + aggregate N updates"),
}


@dataclass
class Outcome:
    name: str
    command: list[str]
    exit_code: int | None  # None: not run (script missing)
    wall_s: float
    raw: Path
    fresh: bool  # the script rewrote its JSON during this run

    def as_dict(self, root: Path) -> dict:
        return {"name": self.name, "command": shlex.join(self.command), "exit_code": self.exit_code,
                "wall_s": round(self.wall_s, 1), "raw": str(self.raw.relative_to(root)), "fresh": self.fresh}


def commands(root: Path, names: list[str], quick: bool) -> dict[str, list[str] | None]:
    """The command line of each named benchmark; None where its script is not in tools/."""
    out: dict[str, list[str] | None] = {}
    for name in names:
        bench = BENCHMARKS[name]
        script = root / "tools" / bench.script
        out[name] = [sys.executable, str(script), *(bench.quick if quick else ())] if script.is_file() else None
    return out


def run_all(root: Path, names: list[str], quick: bool) -> list[Outcome]:
    """Run each benchmark in turn (its output goes to this terminal); a failure does not stop the rest."""
    outcomes = []
    for name, command in commands(root, names, quick).items():
        raw = root / "docs" / f"bench_{name}.json"
        if command is None:
            print(f"bench: {name}: tools/{BENCHMARKS[name].script} not found, skipped", file=sys.stderr)
            outcomes.append(Outcome(name, [], None, 0.0, raw, False))
            continue
        print(f"bench: {name}: $ {shlex.join(command)}", file=sys.stderr, flush=True)
        began, wall = time.time(), time.monotonic()
        code = subprocess.run(command, cwd=root).returncode
        fresh = raw.is_file() and raw.stat().st_mtime >= began - 1
        outcomes.append(Outcome(name, command, code, time.monotonic() - wall, raw, fresh))
    return outcomes


def machine() -> dict[str, object]:
    """The machine the numbers came from: benchdoc's description (device/measure.py's), with the
    core count, OS and architecture the summary line shows."""
    info = platform_info()
    return {"onnxruntime": "not installed", "torch": "not installed", **benchdoc.machine(),
            "cores": info["platform_cpu_count"], "os": f"{info['platform_system']} {info['platform_release']}",
            "machine": info["platform_machine"]}


def machine_line(m: dict[str, object]) -> str:
    return (f"Machine: {m['cores']} CPUs ({m['cpu']}, {m['machine']}), {m['ram_gib']} GiB RAM, {m['os']}; "
            f"Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}; {m['date']}.")


def headline(name: str, data: object) -> str:
    """One sentence of a benchmark's JSON; '-' when its shape is not the one expected."""
    try:
        if name == "federation":
            parts = [f"{codec}: {records[-1]['accuracy']:.1%}, {_per_update(records):.1f} KiB/update"
                     for codec, records in data["federated"].items()]
            if data.get("centralized"):
                parts.append(f"centralized: {data['centralized'][-1]['accuracy']:.1%}")
            return "final accuracy " + "; ".join(parts)
        if name == "coordinator":
            worst = max(data, key=lambda r: r["decode_s"] + r["fedavg_s"])
            return (f"{worst['updates']} updates decode + FedAvg in <= {worst['decode_s'] + worst['fedavg_s']:.2f} s "
                    f"(slowest codec {worst['codec']})")
        targets = data["targets"]
        flat = [t for group in targets.values() for t in group] if isinstance(targets, dict) else list(targets)
        return f"{sum(bool(t['passed']) for t in flat)}/{len(flat)} targets pass"
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError):
        return "-"


def summarise(root: Path, outcomes: list[Outcome], quick: bool, m: dict[str, object]) -> tuple[dict, str]:
    """(docs/bench_summary.json content, the markdown table)."""
    rows = ["| benchmark | measures | result | status | wall s | raw numbers |", "|---|---|---|---|---|---|"]
    entries = []
    for o in outcomes:
        data = json.loads(o.raw.read_text(encoding="utf-8")) if o.raw.is_file() else None
        entry = o.as_dict(root) | {"headline": headline(o.name, data) if data is not None else "-"}
        entries.append(entry)
        status = ("skipped (no script)" if o.exit_code is None else f"failed (exit {o.exit_code})" if o.exit_code
                  else "ok" if o.fresh else "ok, JSON not rewritten")
        raw = f"`{entry['raw']}`" if o.raw.is_file() else "-"
        rows.append(f"| {o.name} | {BENCHMARKS[o.name].what} | {entry['headline']} | {status} | "
                    f"{o.wall_s:.0f} | {raw} |")
    summary = {"machine": m, "quick": quick, "benchmarks": entries}
    return summary, "\n".join(rows)


def write_docs(root: Path, summary: dict, table: str) -> Path:
    """docs/bench_summary.json, and the header of docs/BENCHMARKS.md (sections kept as they are)."""
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "bench_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    doc = docs / "BENCHMARKS.md"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    kind = "quick run (`edgeftl bench --quick`)" if summary["quick"] else "full run (`edgeftl bench`)"
    section = "\n".join([START, f"Last `edgeftl bench`: {kind}; details in each section below.", "", table, END])
    text = re.sub(re.escape(START) + r".*?" + re.escape(END) + r"\n*", "", text, flags=re.DOTALL)
    line = machine_line(summary["machine"])
    if re.search(r"^Machine: .*$", text, flags=re.MULTILINE):  # the first one is the header's
        text = re.sub(r"^Machine: .*$", lambda _: line + "\n\n" + section, text, count=1, flags=re.MULTILINE)
    else:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{line}\n\n{section}\n\n{rest.lstrip()}"
    doc.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return doc


def _per_update(records: list[dict]) -> float:
    return sum(r["bytes_up"] for r in records) / sum(r["updates_received"] for r in records) / 1024
