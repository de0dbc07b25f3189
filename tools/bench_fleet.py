"""Fleet scale: round latency and memory with N connected light devices and S sampled per round.

    .venv/bin/python tools/bench_fleet.py --bundle BUNDLE                     # 100:50, 1000:50, 1000:500
    .venv/bin/python tools/bench_fleet.py --bundle BUNDLE --runs 10000:500    # one run

Per run: a private Mosquitto, the fleet load generator (tools/fleet_load.py, light devices replying at
once) and `edgeftl coordinator` as three processes. Measured: each round's wall time from opening the
round (sample, task published) to its aggregated global published (the record's wall_s: no training in
it), the coordinator's peak RSS (VmHWM, polled), the broker's peak RSS (VmHWM, read before it stops),
and the load generator's peak RSS (its processes' own report, summed). One JSON line per run on stdout
and, with --out, all of them in a JSON file (written atomically).
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeftl.coordinator.simulation.broker import MosquittoBroker
from edgeftl.coordinator.simulation.fleet import raise_open_files
from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.manifest import read_manifest

TOOL = Path(__file__).resolve().parent / "fleet_load.py"
CLI = [sys.executable, "-m", "edgeftl.device.cli"]


def proc_kib(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime, stime in clock ticks (USER_HZ = 100)


class Peak(threading.Thread):
    """Polls a process's VmHWM and CPU until stopped, and its CPU each time a round record appears in
    `metrics` (rounds run back to back: the CPU between two records is one round's, +-0.1 s)."""

    def __init__(self, pid: int, metrics: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.metrics, self.hwm_kib, self.cpu_s, self.done = pid, metrics, 0, 0.0, threading.Event()
        self.cpu_at_record: list[float] = []

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.hwm_kib = max(self.hwm_kib, proc_kib(self.pid, "VmHWM"))
            self.cpu_s = max(self.cpu_s, cpu_s(self.pid))
            lines = self.metrics.read_bytes().count(b"\n") if self.metrics.exists() else 0
            self.cpu_at_record += [self.cpu_s] * (lines - len(self.cpu_at_record))

    def cpu_per_round(self) -> list[float]:
        """CPU seconds of rounds 1.. (round 0's start is not marked)."""
        marks = self.cpu_at_record
        return [round(b - a, 2) for a, b in itertools.pairwise(marks)]


def one_run(bundle: Path, devices: int, sampled: int, rounds: int, codec: str, downlink: str, procs: int) -> dict:
    raise_open_files(devices + 256)  # the broker started below inherits it
    with MosquittoBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        began = time.monotonic()
        fleet = subprocess.Popen([sys.executable, str(TOOL), "--broker", broker.url, "--bundle", str(bundle),
                                  "--devices", str(devices), "--procs", str(procs), "--quiet"],
                                 stdout=subprocess.PIPE, text=True)
        coordinator = subprocess.Popen([*CLI, "coordinator", "--broker", broker.url, "--bundle", str(bundle),
                                        "--out", str(Path(tmp) / "run"), "--rounds", str(rounds),
                                        "--devices-per-round", str(sampled), "--wait-devices", str(devices),
                                        "--wait-devices-s", "600", "--deadline-s", "120", "--codec", codec,
                                        "--downlink", downlink],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = Peak(coordinator.pid, Path(tmp) / "run" / "metrics.jsonl")
        peak.start()
        _, err = coordinator.communicate(timeout=1800)
        peak.done.set()
        peak.join()
        broker_hwm = proc_kib(broker.pid or 0, "VmHWM")
        fleet.send_signal(signal.SIGTERM)
        out, _ = fleet.communicate(timeout=120)
        if coordinator.returncode != 0:
            raise RuntimeError(f"coordinator failed ({coordinator.returncode}): {err.strip().splitlines()[-1:]}")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    walls = [r["wall_s"] for r in records]
    return {"devices": devices, "sampled": sampled, "rounds": rounds, "codec": codec, "downlink": downlink,
            "fleet_procs": procs, "trainable": read_manifest(bundle).trainable_count,
            "devices_online": [r["devices_online"] for r in records],
            "updates_received": [r["updates_received"] for r in records],
            "coordinator_link_dropped": [r.get("link_dropped", 0) for r in records],
            "round_s_median": round(statistics.median(walls), 3), "round_s_max": round(max(walls), 3),
            "close_s": [r.get("close_s") for r in records],  # last reply -> global published, the coordinator's
            "coordinator_peak_rss_mib": round(peak.hwm_kib / 1024, 1), "coordinator_cpu_s_total": peak.cpu_s,
            "coordinator_cpu_s_rounds": peak.cpu_per_round(),
            "broker_peak_rss_mib": round(broker_hwm / 1024, 1),
            "fleet_peak_rss_mib": sum(c["peak_rss_mib"] for c in counts),
            "wall_s_total": round(time.monotonic() - began, 1)}


def parse_runs(text: str) -> list[tuple[int, int]]:
    try:
        runs = [(int(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--runs takes DEVICES:SAMPLED[,...], e.g. 100:50,1000:500; "
                                         f"got {text!r}") from None
    if any(d < 1 or s < 1 for d, s in runs):
        raise argparse.ArgumentTypeError(f"--runs needs positive counts, got {text!r}")
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--runs", type=parse_runs, default=parse_runs("100:50,1000:50,1000:500"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--codec", default="topk:0.1+int8", help="uplink codec (default: topk:0.1+int8)")
    p.add_argument("--downlink", default="none", help="codec of the per-round global delta (default: none)")
    p.add_argument("--procs", type=int, default=0, help="load generator processes; 0: 1 below 2,000 devices, else 2")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = []
    for devices, sampled in args.runs:
        print(f"run: {devices} devices, {sampled} sampled, {args.rounds} rounds ...", file=sys.stderr, flush=True)
        procs = args.procs or (1 if devices < 2000 else 2)
        results.append(one_run(args.bundle, devices, sampled, args.rounds, args.codec, args.downlink, procs))
        print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        atomic_write(args.out, json.dumps(results, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
