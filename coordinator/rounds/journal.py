"""The open round's journal: its task and every update accepted so far, under <out>/journal/.

A coordinator killed mid-round loses what its process held; the devices that already replied
will not train that round again (a device acts on each (run, round) once). So the round loop
writes the round's sampled devices when it opens the round and each accepted update's bytes
and error reply (`messages.encode`, atomically, one file per device) as it accepts them; a resumed coordinator
reopens that round with the same devices, takes the journaled updates through the inbox again,
and waits only for the rest. The journal is dropped once the round's checkpoint is written.

    journal/round.json          {"run_id", "round", "devices", "sampler"}
    journal/<device_id>.reply   an accepted update or error reply, as received
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.messages import ErrorReply, Update, encode

FOLDER, ROUND = "journal", "round.json"
SUFFIX = ".reply"


@dataclass
class Journaled:
    """A round a killed coordinator left open: its devices and the updates it had accepted."""

    round: int
    devices: list[str]
    updates: list[bytes]
    sampler: dict | None = None  # the sampler's state once it drew `devices` (None: a journal from before)


def open_round(out: Path, run_id: str, round_index: int, devices: list[str], sampler: dict | None = None) -> None:
    """Start the round's journal (an older round's is dropped: its checkpoint exists). `sampler` is
    the sampling state after drawing `devices`, so that a resumed run goes on drawing as this one."""
    clear(out)
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True)
    head = {"run_id": run_id, "round": round_index, "devices": devices, "sampler": sampler}
    atomic_write(folder / ROUND, json.dumps(head))


def keep(out: Path, reply: Update | ErrorReply) -> None:
    """Journal one accepted reply (device ids are safe file names: [A-Za-z0-9_.-], no leading dot)."""
    atomic_write(Path(out) / FOLDER / f"{reply.device_id}{SUFFIX}", encode(reply))


def reply(out: Path, device_id: str) -> bytes:
    """The journaled reply of one device of the open round, as kept (OSError when there is none)."""
    return (Path(out) / FOLDER / f"{device_id}{SUFFIX}").read_bytes()


def read(out: Path, run_id: str, round_index: int) -> Journaled | None:
    """The journal of `round_index` of `run_id`, or None when there is none (or it is another's).
    Its updates are untrusted bytes again: the caller passes them through the inbox."""
    folder = Path(out) / FOLDER
    try:
        head = json.loads((folder / ROUND).read_text(encoding="utf-8"))
        devices = [str(d) for d in head["devices"]]
        if head["run_id"] != run_id or head["round"] != round_index:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    updates = [path.read_bytes() for path in sorted(folder.glob(f"*{SUFFIX}")) if path.stem in devices]
    sampler = head.get("sampler")
    return Journaled(round_index, devices, updates, sampler if isinstance(sampler, dict) else None)


def clear(out: Path) -> None:
    shutil.rmtree(Path(out) / FOLDER, ignore_errors=True)
