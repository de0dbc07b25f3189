"""Streaming aggregation against the kept list: memory and time to take S updates of N parameters.

    .venv/bin/python tools/bench_stream.py                       # 74,498 parameters; 50, 500 and 2,000 updates
    .venv/bin/python tools/bench_stream.py --out docs/bench_stream.json

Each update is made, encoded with the codec, taken through a real Inbox (decoded, checked) and given
to the accumulator (coordinator/rounds/accumulate.py), then dropped, as the round loop does; the round
is then closed (guards, the weight cap's corrections) and aggregated by FedAvg. Measured per path:
tracemalloc's peak while taking and closing (numpy's buffers are traced), and the wall time of taking
and closing (the fastest of --repeat untraced passes, alternating the paths), both as ratios
streaming / list. One JSON line per case on stdout; with --out, all of them in a JSON file (written
atomically). One device in 20 claims 50x the median samples, so the
weight cap corrects a few updates at close (read back through `reload`, here from memory: the loop
reads the journal).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from edgeftl.coordinator.rounds.accumulate import KeptUpdates, StreamingMean
from edgeftl.coordinator.rounds.inbox import Inbox, ReceivedUpdate
from edgeftl.coordinator.rounds.strategy import FedAvg
from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.codecs import parse_codec
from edgeftl.device.protocol.messages import Update

SHA = "b" * 64


def delta_of(i: int, size: int) -> np.ndarray:
    return (np.random.default_rng(i).normal(size=size) * 1e-3).astype(np.float32)


def one_case(size: int, count: int, codec_spec: str, streaming: bool, trace: bool) -> dict:
    """Take `count` updates into one accumulator and close it; peak traced bytes (with `trace`) and
    seconds (timed without tracing, whose bookkeeping would slow both paths)."""
    codec = parse_codec(codec_spec)
    encoded = [codec.encode(delta_of(i, size)) for i in range(min(count, 64))]  # made before measuring
    inbox = Inbox("run", SHA, size)
    inbox.open_round(0, [f"d{i}" for i in range(count)])
    reload = lambda device: codec.decode(encoded[int(device[1:]) % len(encoded)])
    gather = StreamingMean(size, 1.0, 10.0, False, reload) if streaming else KeptUpdates()
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    for i in range(count):
        samples = 1600 if i % 20 == 7 else 32  # the cap (10 x median 32) corrects these at close
        taken = inbox.take(Update("run", 0, SHA, f"d{i}", samples, 0, encoded[i % len(encoded)]), 0)
        assert isinstance(taken, ReceivedUpdate)
        gather.add(f"d{i}", taken.delta, float(samples))
        del taken
    closed = gather.close(1.0, 10.0, None, 0, count, count)
    result = FedAvg().aggregate(np.zeros(size, np.float32), closed.updates)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    if trace:
        tracemalloc.stop()
    return {"peak_mib": round(peak / 2**20, 2), "seconds": round(seconds, 3),
            "capped": closed.guarded["weights_capped"], "checksum": float(np.abs(result).sum())}


def compare(size: int, count: int, codec: str, repeat: int) -> dict:
    listed = one_case(size, count, codec, False, trace=True)
    streamed = one_case(size, count, codec, True, trace=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeat):  # alternating, so a busy moment of the shared machine hits both
        for streaming in (False, True):
            times[streaming].append(one_case(size, count, codec, streaming, trace=False)["seconds"])
    listed["seconds"], streamed["seconds"] = min(times[False]), min(times[True])
    vector_mib = 4 * size / 2**20
    return {"parameters": size, "updates": count, "codec": codec, "vector_mib": round(vector_mib, 3),
            "list_peak_mib": listed["peak_mib"], "stream_peak_mib": streamed["peak_mib"],
            "stream_peak_vectors": round(streamed["peak_mib"] / vector_mib, 1),
            "memory_ratio_stream_over_list": round(streamed["peak_mib"] / listed["peak_mib"], 4),
            "list_s": listed["seconds"], "stream_s": streamed["seconds"],
            "time_ratio_stream_over_list": round(streamed["seconds"] / listed["seconds"], 2),
            "weights_capped": streamed["capped"],
            "same_result": bool(np.isclose(streamed["checksum"], listed["checksum"], rtol=1e-5))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parameters", type=int, default=74_498, help="trainable values (default: MiniLM top-2 LoRA)")
    p.add_argument("--updates", default="50,500,2000", help="comma-separated update counts")
    p.add_argument("--codec", default="topk:0.1+int8")
    p.add_argument("--repeat", type=int, default=3, help="untraced timing passes per path (default: 3)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for count in (int(c) for c in args.updates.split(",")):
        rows.append(compare(args.parameters, count, args.codec, args.repeat))
        print(json.dumps(rows[-1]), flush=True)
    if args.out is not None:
        atomic_write(args.out, json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["same_result"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
