"""Starting and stopping the fleet load generator (tools/fleet_load.py) in the fleet tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fleet_load.py"


def start_fleet(url: str, folder: Path, prefix: str, name_prefix: str, devices: int,
                *flags: str) -> subprocess.Popen[str]:
    """`devices` light devices named `name_prefix`-N on `url` (a broker or a comma-separated list),
    quiet, reporting on stdout; `flags` are fleet_load.py's other options."""
    return subprocess.Popen(
        [sys.executable, str(TOOL), "--broker", url, "--bundle", str(folder), "--devices", str(devices),
         "--prefix", prefix, "--name-prefix", name_prefix, *flags, "--quiet"], stdout=subprocess.PIPE, text=True)


def stop_fleet(fleet: subprocess.Popen[str]) -> list[dict]:
    """SIGTERM, then its processes' reports (one JSON object each). A fleet still there after 60 s is
    killed (its helper notices its parent is gone and leaves too) and the timeout raised."""
    fleet.send_signal(signal.SIGTERM)
    try:
        out, _ = fleet.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        fleet.kill()
        raise
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
