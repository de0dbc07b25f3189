"""What every benchmark script shares: the machine description, the commit, and rewriting only
its own marked section of docs/BENCHMARKS.md (so the scripts never clobber each other); and the
settings the federation benchmarks (federation, dp, poisoning) have in common."""

from __future__ import annotations

import argparse
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from edgeftl.device.measure import cpu_model, platform_info, usable_cpus

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"


def machine() -> dict:
    """The machine the numbers came from: device/measure.py's description, plus versions and the date."""
    info = platform_info()
    memory = info["platform_total_memory_mib"]
    return {"nproc": usable_cpus(), "ram_gib": round(memory / 1024, 1) if memory else None, "cpu": cpu_model(),
            "python": info["platform_python"], **versions("onnxruntime", "torch"),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def versions(*distributions: str) -> dict[str, str]:
    """Installed versions of the named distributions; those not installed are left out."""
    found = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_state() -> dict:
    """Commit the benchmark ran from; `dirty` when the working tree had uncommitted changes."""
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_line(m: dict) -> str:
    if m.get("onnxruntime"):
        ort = f"onnxruntime {m['onnxruntime']}"
    else:  # runs from before devices moved to stock onnxruntime
        ort = f"onnxruntime-training {m.get('onnxruntime-training-cpu') or m.get('onnxruntime-training', '?')}"
    return (f"Machine: {m['nproc']} CPUs (nproc), {m['ram_gib']} GiB RAM, {m['cpu']}; Python {m['python']}, "
            f"{ort}, torch {m.get('torch', '?')}; {m['date']}.")


def write_section(name: str, section: str, machine_info: dict | None = None, doc: Path = DOC) -> None:
    """Replace `<!-- NAME:start -->...<!-- NAME:end -->` in docs/BENCHMARKS.md (append if absent).

    `section` must include both markers. With `machine_info`, the file's `Machine:` line is
    refreshed too.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not (section.startswith(start) and section.rstrip().endswith(end)):
        raise ValueError(f"section for {name!r} must start with {start} and end with {end}")
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n\nMachine: ?\n"
    if machine_info is not None:
        text = re.sub(r"^Machine: .*$", lambda _: machine_line(machine_info), text, count=1, flags=re.MULTILINE)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip(), text)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip()
    doc.write_text(text.rstrip("\n") + "\n", encoding="utf-8")  # idempotent: no newline piles up


def add_federation_args(parser: argparse.ArgumentParser, name: str, rounds: int) -> None:
    """--work, --devices, --alpha, --rounds, --steps, --lr: the federation benchmarks' common settings."""
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / name)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=5, help="local steps per device per round")
    parser.add_argument("--lr", type=float, default=2e-3)
