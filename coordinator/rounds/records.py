"""The run's records: metrics.jsonl in the run folder, one JSON object per round.

The round loop is their one writer (`append`); reports and plots only read them
(`coordinator/report/load.py`, which imports the name and format from here). A record is
appended with one write (`device/files.py` `append_jsonl`), so a coordinator killed mid-round
leaves at most one truncated last line, which readers skip. Torch-free, like the loop.
"""

from __future__ import annotations

from pathlib import Path

from edgeftl.device.files import append_jsonl
from edgeftl.device.protocol.messages import metric_ok

METRICS = "metrics.jsonl"
METRICS_FORMAT = 1  # the `format` field of every record; readers refuse records of another format


# Record fields that readers sum or take maxima of; `clean` turns anything else found there into 0.
COUNTERS = ("devices_online", "devices_selected", "updates_received", "updates_late", "updates_redelivered",
            "updates_rejected", "updates_failed", "link_dropped", "chunks_evicted",
            "bytes_up", "bytes_down", "bytes_published", "device_peak_rss_mib", "wall_s", "close_s",
            "updates_used", "refused_stale", "devices_training", "elapsed_s")  # the last four: async versions
MEASURES = ("accuracy", "loss", "perplexity")  # evaluation results: dropped when not numbers


def clean(record: dict) -> dict:
    """A record as readers may use it, whatever was written: counters numbers, measures numbers or
    absent, and each device's metrics only the entries the protocol allows (messages.metric_ok)."""
    for key in COUNTERS:
        if key in record and not is_number(record[key]):
            record[key] = 0
    for key in MEASURES:
        if key in record and not is_number(record[key]):
            del record[key]
    devices = record.get("devices")
    record["devices"] = {str(d): {k: v for k, v in m.items() if metric_ok(k, v)} if isinstance(m, dict) else {}
                         for d, m in devices.items()} if isinstance(devices, dict) else {}
    return record


def is_number(value: object) -> bool:
    """A finite int or float (not a bool) that converts to float without overflow."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300


def number(value: object) -> float:
    """A value from a record or a device's metrics as a number for sums and maxima: 0 for anything
    that is not a finite number (records are read back from disk, and metrics come from devices)."""
    return float(value) if isinstance(value, (int, float)) and is_number(value) else 0.0


def append(folder: Path, record: dict) -> None:
    """Append one round's record to folder/metrics.jsonl."""
    append_jsonl(Path(folder) / METRICS, record)


def start_fresh(folder: Path) -> None:
    """Drop folder's records: a new run in an old folder must not continue the old run's rounds."""
    (Path(folder) / METRICS).unlink(missing_ok=True)
