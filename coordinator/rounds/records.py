"""The run's records: metrics.jsonl in the run folder, one JSON object per round.

The round loop is their one writer (`append`); reports and plots only read them
(`coordinator/report/load.py`, which imports the name and format from here). A record is
appended with one write (`device/files.py` `append_jsonl`), so a coordinator killed mid-round
leaves at most one truncated last line, which readers skip. Torch-free, like the loop.
"""

from __future__ import annotations

from pathlib import Path

from edgeftl.device.files import append_jsonl

METRICS = "metrics.jsonl"
METRICS_FORMAT = 1  # the `format` field of every record; readers refuse records of another format


def append(folder: Path, record: dict) -> None:
    """Append one round's record to folder/metrics.jsonl."""
    append_jsonl(Path(folder) / METRICS, record)


def start_fresh(folder: Path) -> None:
    """Drop folder's records: a new run in an old folder must not continue the old run's rounds."""
    (Path(folder) / METRICS).unlink(missing_ok=True)
