"""Test-only failpoints: pause a process at a named point so a fault test can act on it there.

With EDGEFTL_FAILPOINT=<name> or <name>:<round> in the environment, `failpoint(name, round)`
prints one marker line to stderr (`EDGEFTL_FAILPOINT <name> <round>`) and sleeps until the
process gets SIGUSR1 (released: it goes on) or is killed. Unset (always, outside
tests/test_crash.py), it returns at once. Standard library only: devices import it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "EDGEFTL_FAILPOINT"
MARKER = "EDGEFTL_FAILPOINT"


def failpoint(name: str, round_index: int) -> None:
    """Pause here when the environment names this point (and round, if it gives one)."""
    wanted = os.environ.get(ENV, "")
    if not wanted:
        return
    point, _, at_round = wanted.partition(":")
    if point != name or (at_round and at_round != str(round_index)):
        return
    released: list[int] = []
    try:
        signal.signal(signal.SIGUSR1, lambda signum, frame: released.append(signum))
    except (ValueError, AttributeError):  # not the main thread, or no SIGUSR1: only a kill ends the pause
        pass
    print(f"{MARKER} {name} {round_index}", file=sys.stderr, flush=True)
    while not released:
        time.sleep(0.05)
