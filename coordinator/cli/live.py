"""The live view of a running federation: a status line and the round's deadline bar.

On a terminal, a display thread polls the coordinator (read-only) a few times a second and
redraws two lines with tqdm: the round, devices online, updates received / late / rejected,
bytes so far and the last accuracy (a causal LM's: perplexity), then a bar of the time left
before the round's deadline.
Finished rounds scroll above it as the same one-line records printed without a terminal.
When the output is not a terminal (CI, `| tee`) nothing is drawn: each round prints its line.

    with LiveView(config.rounds, config.deadline_s, round_line) as view:
        coordinator = Coordinator(..., on_round=view.on_round)
        view.attach(coordinator)   # optional: intra-round progress; without it, per round only
        coordinator.run()
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

REFRESH_S = 0.25


@dataclass
class Progress:
    """What the display shows; counters are for the round in progress."""

    round: int  # 0-based index of the round in progress (or the next one)
    online: int
    selected: int
    received: int
    late: int
    rejected: int
    bytes_up: int  # so far in the run, as counted by the coordinator's transport or the records
    bytes_down: int
    accuracy: float | None
    elapsed_s: float  # since the round began
    live: bool = True  # counters of the round in progress; False: of the last finished round
    failed: int = 0  # sampled devices that replied with an error instead of an update
    perplexity: float | None = None  # a causal LM's held-out perplexity, shown instead of accuracy


def snapshot(coordinator) -> dict:
    """The coordinator's intra-round counters (`Inbox.progress()`), online devices and bytes."""
    return {**coordinator.inbox.progress(), "online": coordinator.online.count,
            "bytes_up": int(coordinator.link.bytes_received), "bytes_down": int(coordinator.link.bytes_sent)}


def status_text(p: Progress, rounds: int) -> str:
    """One line, the most telling numbers first (a narrow terminal cuts the end)."""
    online = f"{p.online} online" if p.online >= 0 else "? online"
    updates = "updates" if p.live else "last round"
    measured = measure_text(p.accuracy, p.perplexity)
    return (f"round {min(p.round + 1, rounds)}/{rounds} | {measured} | {online} | {updates} "
            f"{p.received}/{p.selected}, {p.late} late, {p.rejected} rejected{failed_suffix(p.failed)} | "
            f"up {_kib(p.bytes_up)}, "
            f"down {_kib(p.bytes_down)}")


class LiveView:
    """Progress of a federation on a terminal; the plain per-round lines anywhere else.

    Args:
        rounds: rounds the run will do in total.
        deadline_s: each round's collection deadline.
        line: formats a finished round's record as one line (printed in both modes).
        stream: where to write; a terminal gets the live display.
        interactive: force the mode; default: `stream.isatty()`.
    """

    def __init__(self, rounds: int, deadline_s: float, line: Callable[[dict], str], stream: TextIO | None = None,
                 interactive: bool | None = None, refresh_s: float = REFRESH_S) -> None:
        self.rounds, self.deadline_s, self.line = rounds, deadline_s, line
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = _is_tty(self.stream) if interactive is None else interactive
        self.refresh_s = refresh_s
        self.coordinator = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict | None = None
        self._totals = {"bytes_up": 0, "bytes_down": 0}
        self._round_seen, self._round_began = -1, time.monotonic()
        self._bars: tuple[tqdm, tqdm] | None = None

    # ---- what the run calls ---------------------------------------------------------------
    def attach(self, coordinator) -> None:
        """Poll this coordinator for intra-round progress (read-only)."""
        self.coordinator = coordinator

    def on_round(self, record: dict) -> None:
        """The coordinator's `on_round` callback: print the round's line, update the display."""
        with self._lock:
            self._last = record
            self._totals["bytes_up"] += record.get("bytes_up", 0)
            self._totals["bytes_down"] += record.get("bytes_published", record.get("bytes_down", 0))
            self._round_began = time.monotonic()  # the loop starts the next round right away
            if not self.interactive:
                print(self.line(record), file=self.stream, flush=True)
                return
            tqdm.write(self.line(record), file=self.stream)  # above the bars, which redraw under it
            self._draw()

    def __enter__(self) -> LiveView:
        if self.interactive:
            self._thread = threading.Thread(target=self._loop, name="edgeftl-live", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            for bar in self._bars or ():
                bar.close()
            self._bars = None

    # ---- the display thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                self._draw()

    def progress(self) -> Progress:
        """The numbers to show now: live from the coordinator when attached, else the last record's."""
        last = self._last or {}
        accuracy = last.get("accuracy")
        round_index = last["round"] + 1 if "round" in last else getattr(self.coordinator, "start_round", 0)
        if self.coordinator is None:
            return Progress(round_index, last.get("devices_online", -1), last.get("devices_selected", 0),
                            last.get("updates_received", 0), last.get("updates_late", 0),
                            last.get("updates_rejected", 0), self._totals["bytes_up"], self._totals["bytes_down"],
                            accuracy, time.monotonic() - self._round_began, live=False,
                            failed=last.get("updates_failed", 0), perplexity=last.get("perplexity"))
        live = snapshot(self.coordinator)
        if live["round"] >= 0 and live["round"] != self._round_seen:
            self._round_seen, self._round_began = live["round"], time.monotonic()
        if live["round"] < 0:  # between rounds or before the first: nothing collected yet
            live.update(selected=0, received=0, late=0, rejected=0, failed=0)
        live["round"] = live["round"] if live["round"] >= 0 else round_index
        return Progress(**live, accuracy=accuracy, elapsed_s=time.monotonic() - self._round_began,
                        perplexity=last.get("perplexity"))

    def _draw(self) -> None:
        if self._bars is None and (self.coordinator is not None or self._last is not None):
            self._bars = self._open_bars()  # not before: setup output (builds, logs) keeps the terminal
        if self._bars is None:
            return
        status, deadline = self._bars
        try:
            p = self.progress()
        except Exception as exc:  # a display must never take the run down
            status.set_description_str(f"(live view unavailable: {type(exc).__name__})", refresh=True)
            return
        status.set_description_str(status_text(p, self.rounds), refresh=False)
        status.refresh()
        deadline.n = min(p.elapsed_s, self.deadline_s)
        deadline.refresh()


    def _open_bars(self) -> tuple[tqdm, tqdm]:
        # A pty may report a 0 x 0 size (e.g. under `script`); tqdm would then hide every bar.
        size = shutil.get_terminal_size(fallback=(100, 24))
        common = {"file": self.stream, "leave": False, "ncols": size.columns if size.columns > 20 else 100,
                  "nrows": size.lines if size.lines > 2 else 24, "mininterval": 0}
        status = tqdm(total=1, position=0, bar_format="{desc}", **common)
        deadline = tqdm(total=self.deadline_s, position=1, bar_format="deadline {bar} {n:.0f} of {total:.0f} s",
                        **common)
        return status, deadline


def measure_text(accuracy: float | None, perplexity: float | None) -> str:
    """`perplexity 23.4` for a causal LM's round, else `accuracy 91.2%` (`-` before any evaluation)."""
    if perplexity is not None:
        return f"perplexity {perplexity:.1f}"
    return f"accuracy {accuracy:.1%}" if accuracy is not None else "accuracy -"


def failed_suffix(count: int) -> str:
    """`, N failed` when sampled devices replied with an error, else nothing."""
    return f", {count} failed" if count else ""


def _kib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value / 1024:.1f} KiB"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
