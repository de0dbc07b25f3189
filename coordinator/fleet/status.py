"""`edgeftl fleet status`: the devices a broker has seen, from their retained statuses.

The pure part turns a device's status (its card, docs/PROTOCOL.md section 6.4) into a `DeviceRow`
and rows into a table or JSON. `read_statuses` is the one part that touches the network: it
subscribes to `<prefix>/status/+` in a fresh clean session, collects what arrives for `wait_s`
after the broker acknowledged the subscription (retained statuses come first), and publishes
nothing: it has no birth, no will, and sends no message.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from edgeftl.device.link import Connection, Incoming, Link, Refused
from edgeftl.device.protocol.auth import Keys
from edgeftl.device.protocol.messages import Status
from edgeftl.device.protocol.topics import Topics

BUNDLE_HEX = 12  # a bundle hash is shown by its first 12 hex digits
STATES = ("online", "offline", "lost")  # lost: offline by its will, the device vanished without closing
MISSING = "-"


@dataclass(frozen=True)
class DeviceRow:
    """One device as its latest status describes it; None where its card says nothing (or it has none)."""

    device_id: str
    state: str  # one of STATES
    platform_machine: str | None = None
    platform_python: str | None = None
    bundle_sha256: str | None = None
    edgeftl_version: str | None = None
    onnxruntime: str | None = None
    package_id: str | None = None
    last_round: int | None = None
    rounds_done: int | None = None
    peak_rss_mib: float | None = None
    started: int | None = None


def row_of(status: Status) -> DeviceRow:
    """The row of one status. A card's values were checked against the protocol's rules (strings or
    numbers); one of the wrong type for its column (a device of another implementation) is left out."""
    info = status.info
    lost = not status.online and info.get("will") == 1
    state = "online" if status.online else ("lost" if lost else "offline")
    return DeviceRow(
        status.device_id, state,
        platform_machine=_str(info.get("platform_machine")), platform_python=_str(info.get("platform_python")),
        bundle_sha256=_str(info.get("bundle_sha256")), edgeftl_version=_str(info.get("edgeftl_version")),
        onnxruntime=_str(info.get("onnxruntime")), package_id=_str(info.get("package_id")),
        last_round=_int(info.get("last_round")), rounds_done=_int(info.get("rounds_done")),
        peak_rss_mib=_float(info.get("peak_rss_mib")), started=_int(info.get("started")),
    )


def rows_of(statuses: Iterable[Status]) -> list[DeviceRow]:
    """One row per status, sorted by device id."""
    return sorted((row_of(status) for status in statuses), key=lambda row: row.device_id)


def count_line(rows: list[DeviceRow]) -> str:
    """"7 devices: 5 online, 2 offline (1 lost)": lost devices are counted among the offline ones."""
    online = sum(row.state == "online" for row in rows)
    lost = sum(row.state == "lost" for row in rows)
    noun = "device" if len(rows) == 1 else "devices"
    line = f"{len(rows)} {noun}: {online} online, {len(rows) - online} offline"
    return line + (f" ({lost} lost)" if lost else "")


COLUMNS = ("DEVICE", "STATE", "PLATFORM", "BUNDLE", "EDGEFTL", "ONNXRUNTIME", "PACKAGE", "ROUND", "PEAK MiB")


def cells(row: DeviceRow) -> tuple[str, ...]:
    """A row's table cells, in COLUMNS order; MISSING where the card says nothing."""
    platform = "/".join(p for p in (row.platform_machine, row.platform_python and f"py{row.platform_python}") if p)
    return (row.device_id, row.state, platform or MISSING, (row.bundle_sha256 or MISSING)[:BUNDLE_HEX],
            row.edgeftl_version or MISSING, row.onnxruntime or MISSING, row.package_id or MISSING,
            MISSING if row.last_round is None else str(row.last_round),
            MISSING if row.peak_rss_mib is None else f"{row.peak_rss_mib:.0f}")


def table(rows: list[DeviceRow]) -> str:
    """The rows as aligned text columns, then the count line."""
    lines = [COLUMNS, *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join([*text, count_line(rows)])


def as_json(rows: list[DeviceRow], refused: list[Refused]) -> dict[str, Any]:
    """What `--json` prints: every row's fields, the counts, and the statuses that failed a check."""
    return {"devices": [asdict(row) for row in rows], "count": len(rows),
            **{state: sum(row.state == state for row in rows) for state in STATES},
            "refused": [{"topic": item.topic, "device_id": item.device_id, "reason": item.reason} for item in refused]}


# ---- reading the broker ---------------------------------------------------------------------


def reader_client_id() -> str:
    """A fresh client id for one look (23 characters of [0-9a-z], what every MQTT 3.1.1 broker accepts):
    its clean session leaves nothing behind on the broker."""
    return "eftlf" + secrets.token_hex(9)


def read_statuses(connection: Connection, prefix: str, wait_s: float, keys: Keys | None = None,
                  connect_timeout_s: float = 10.0) -> tuple[list[Status], list[Refused]]:
    """The latest status of every device on `<prefix>/status/+`, and what failed a check there.

    Args:
        connection: an unconnected connection (a clean session); nothing is published through it.
        wait_s: how long to collect after the subscription is acknowledged (retained statuses arrive
            at once; a longer wait also catches devices changing state meanwhile).
        keys: with trusted keys, statuses not signed by their device are refused.

    Raises:
        LinkError: the broker cannot be reached or refused us.
    """
    link = Link(connection, prefix, [], keys=keys)
    link.subscribe_state(Topics(prefix).status_filter)
    link.connect(connect_timeout_s)  # returns once the SUBACK is in
    latest: dict[str, Status] = {}
    refused: list[Refused] = []
    try:
        end = time.monotonic() + wait_s
        while (left := end - time.monotonic()) > 0:
            item = link.receive(min(left, 0.2))
            if isinstance(item, Incoming) and isinstance(item.message, Status):
                latest[item.message.device_id] = item.message
                refused = [r for r in refused if r.device_id != item.message.device_id]
            elif isinstance(item, Refused):
                refused.append(item)
    finally:
        link.close()
    return list(latest.values()), refused


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
