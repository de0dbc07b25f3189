"""Secure aggregation's cost: bytes each device sends per stage and time per stage, against plain updates.

    PYTHONPATH=build/pp .venv/bin/python tools/bench_secagg.py --devices 10 --size 1000000 --out secagg.json

Bytes are whole protocol messages (docs/PROTOCOL.md section 4), as the link would publish them
before chunking; a plain update is compared as fp32 (`none`) and as `topk:0.02+int4`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgeftl.device.protocol.codecs import Encoded, parse_codec
from edgeftl.device.protocol.messages import SecAgg, Update, encode
from edgeftl.device.secagg import crypto
from edgeftl.device.secagg.client import SecAggClient
from edgeftl.device.secagg.fixedpoint import FixedPoint
from edgeftl.device.secagg.messages import to_payload
from edgeftl.device.secagg.server import SecAggServer

SHA = "0" * 64


def message_bytes(stage, device: str) -> int:
    name, payload, masked = to_payload(stage)
    return len(encode(SecAgg("run", 0, SHA, device, name, payload, masked)))


def update_bytes(codec: str, delta: np.ndarray) -> int:
    encoded: Encoded = parse_codec(codec).encode(delta)
    return len(encode(Update("run", 0, SHA, "dev0", 10, 1, encoded)))


def run(devices: int, size: int, dropped: int) -> dict:
    rng = np.random.default_rng(0)
    ids = [f"dev{i:03d}" for i in range(devices)]
    ctx = crypto.context("run", 0, SHA)
    clients = {d: SecAggClient(d, ctx) for d in ids}
    server = SecAggServer(ctx, ids, size, FixedPoint(max_devices=devices))
    seconds: dict[str, float] = {}

    def timed(name: str, work):
        began = time.perf_counter()
        result = work()
        seconds[name] = round(time.perf_counter() - began, 4)
        return result

    keys = {d: clients[d].advertise() for d in ids}
    for d in ids:
        server.advertise(d, keys[d])
    rosters = server.roster()
    shares = {d: timed("share_per_device_s", lambda d=d: clients[d].share(rosters[d])) for d in ids}
    for d in ids:
        server.share(d, shares[d])
    boxes = server.ciphertexts()
    delta = rng.normal(0, 1e-3, size).astype(np.float32)
    alive = ids[: devices - dropped]
    for d in ids:
        clients[d].receive(boxes[d])
    masked = {d: timed("mask_per_device_s", lambda d=d: clients[d].mask(delta, 100)) for d in alive}
    for d in alive:
        server.masked(d, masked[d])
    lists = server.survivors()
    replies = {d: clients[d].unmask(lists[d]) for d in alive}
    for d in alive:
        server.unmask(d, replies[d])
    timed(f"unmask_server_s_{dropped}_dropped", server.aggregate)
    d0 = ids[0]
    up = {"advertise": message_bytes(keys[d0], d0), "share": message_bytes(shares[d0], d0),
          "masked": message_bytes(masked[d0], d0), "unmask": message_bytes(replies[d0], d0)}
    down = {"roster": message_bytes(rosters[d0], d0), "ciphertexts": message_bytes(boxes[d0], d0),
            "survivors": message_bytes(lists[d0], d0)}
    return {"devices": devices, "size": size, "dropped_after_sharing": dropped,
            "bytes_up_per_device": up, "bytes_down_per_device": down,
            "bytes_up_secagg_total": sum(up.values()),
            "bytes_update_fp32": update_bytes("none", delta),
            "bytes_update_topk_0.02_int4": update_bytes("topk:0.02+int4", delta), **seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dropped", type=int, default=1, help="devices that share keys but never send a masked vector")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = run(args.devices, args.size, args.dropped)
    for key, value in result.items():
        print(f"{key:32s} {value}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
