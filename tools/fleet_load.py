"""Fleet load generator: N light devices (real MQTT connections, no training) against a broker.

    .venv/bin/python tools/fleet_load.py --broker mqtt://127.0.0.1:1883 --bundle BUNDLE --devices 1000

A load tool that runs beside a separately started coordinator (and any real devices), not a whole
simulated run, so it lives here rather than in `edgeftl simulate`. Flags: --help; the code is
edgeftl.coordinator.simulation.fleet_cli (one selectors loop per process, --procs processes).
"""

from __future__ import annotations

import sys

from edgeftl.coordinator.simulation.fleet_cli import main

if __name__ == "__main__":
    sys.exit(main())
