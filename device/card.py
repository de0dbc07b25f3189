"""A device's card: what `edgeftl fleet status` shows of it, sent as its status's `info`.

The fixed part (platform, runtime versions, bundle, package) is read once when the agent starts;
the agent adds its progress (last round answered, updates sent, peak memory) after each answered
round. Keys and values follow the status rules of docs/PROTOCOL.md section 6.4.

A flashed release holds the bundle beside its package manifest (`<release>/bundle` and
`<release>/edgeftl-package.json`, written by `edgeftl package`), which names the package the device
runs and the edgeftl version it was built from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import time
from pathlib import Path

from edgeftl.device.measure import available_memory_mib, peak_rss_mib, platform_info
from edgeftl.device.protocol.messages import MAX_TEXT, StatusInfo

log = logging.getLogger("edgeftl.device")
PACKAGE_MANIFEST = "edgeftl-package.json"
PACKAGE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PACKAGE_ID_HEX = 16  # a package id is the first 16 hex of the sha256 of its manifest's bytes
UNKNOWN = "unknown"

Card = StatusInfo  # what the agent keeps and announces


def device_card(bundle: Path, bundle_sha256: str, package_id: str | None = None) -> Card:
    """The card of a device that holds `bundle`, before any round.

    Args:
        bundle: the bundle folder; a package manifest beside it names the package and the version.
        bundle_sha256: the bundle's hash (device/protocol/manifest.py bundle_sha256).
        package_id: the release id flash passed (`--package-id`); None: the manifest's, if any.
    """
    machine = platform_info()
    card: Card = {
        "platform_machine": _text(machine["platform_machine"]),
        "platform_python": _text(machine["platform_python"]),
        "onnxruntime": onnxruntime_version(),
        "edgeftl_version": edgeftl_version(bundle),
        "bundle_sha256": bundle_sha256,
        "started": int(time.time()),
        "peak_rss_mib": peak_rss_mib(),
        "rounds_done": 0,
    }
    package = package_id if package_id is not None else package_id_of(bundle)
    if package is not None:
        card["package_id"] = check_package_id(package)
    return with_memory(card)


def with_memory(card: Card) -> Card:
    """The card with the machine's available memory now (what `--sample memory` weighs by); left
    out where it is not known."""
    free = available_memory_mib()
    return {**card, "mem_available_mib": free} if free is not None else card


def check_package_id(package_id: str) -> str:
    """Raises ValueError naming a package id that is not 1-64 characters of [A-Za-z0-9_.-]."""
    if not isinstance(package_id, str) or not PACKAGE_ID.fullmatch(package_id):
        raise ValueError(f"bad package id {package_id!r}: use 1-64 characters from [A-Za-z0-9_.-] "
                         "(edgeftl flash passes the release id, 16 hex)")
    return package_id


def package_manifest(bundle: Path) -> Path:
    return Path(bundle).resolve().parent / PACKAGE_MANIFEST


def package_id_of(bundle: Path) -> str | None:
    """The id of the package the bundle came in: the first 16 hex of the sha256 of its manifest's
    bytes as they are (the package helper writes them canonical), or None without one."""
    try:
        data = package_manifest(bundle).read_bytes()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest()[:PACKAGE_ID_HEX]


def edgeftl_version(bundle: Path) -> str:
    """The version of the runtime this process runs: the package manifest's when the bundle came in
    a package (it names exactly the files flashed, `+g<hash>` included; a stray installed copy
    elsewhere on the machine would not), else the installed distribution's, else "unknown"."""
    try:
        manifest = json.loads(package_manifest(bundle).read_text(encoding="utf-8"))
        version = manifest.get("edgeftl_version") if isinstance(manifest, dict) else None
        if isinstance(version, str) and version:
            return _text(version)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("package manifest beside %s unreadable (%s); not taking its version", bundle, exc)
    try:
        return _text(importlib.metadata.version("edgeftl"))
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


def onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return UNKNOWN
    return _text(getattr(onnxruntime, "__version__", UNKNOWN))


def with_progress(card: Card, last_round: int, rounds_done: int) -> Card:
    """The card after the device answered `last_round` (an update or an error reply), having sent
    `rounds_done` updates; the peak memory is this process's so far, the available memory the machine's now."""
    return with_memory({**card, "last_round": last_round, "rounds_done": rounds_done, "peak_rss_mib": peak_rss_mib()})


def _text(value: object) -> str:
    """A card string: printable, at most MAX_TEXT characters (the status rule), "unknown" if empty."""
    text = "".join(ch for ch in str(value) if ch.isprintable())[:MAX_TEXT]
    return text or UNKNOWN
