"""Read a run folder: metrics.jsonl (one record per round) and config.json, validated.

The coordinator is the one writer of metrics.jsonl; this module only reads it. A coordinator
killed mid-write leaves a truncated last line: the complete rounds are kept and each line
skipped is named in `Run.warnings`. Anything that cannot make a report (no folder, no
complete record, a metrics format this code does not know) raises `ReportError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeftl.coordinator.rounds.records import METRICS, METRICS_FORMAT, clean

CONFIG = "config.json"


class ReportError(ValueError):
    """A run folder that cannot be reported on; the message names the folder or file."""


@dataclass
class Run:
    """One run folder's complete rounds, its configuration and what was skipped reading it."""

    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)  # config.json sections, values parsed
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def codec(self) -> str:
        return str(self.setting("rounds", "codec") or "?")

    @property
    def label(self) -> str:
        """Legend text: run folder name and uplink codec (once, when the folder is named after it)."""
        return self.name if self.name == self.codec else f"{self.name} ({self.codec})"

    @property
    def trainable_params(self) -> int | None:
        value = self.setting("bundle", "trainable_params")
        return int(value) if isinstance(value, (int, float)) and value > 0 else None

    def setting(self, section: str, key: str) -> object:
        block = self.config.get(section)
        return block.get(key) if isinstance(block, dict) else None

    def devices(self) -> list[str]:
        """Every device id that sent an accepted update, sorted."""
        return sorted({d for r in self.records for d in r.get("devices", {})})


def load_run(path: Path) -> Run:
    """Read one run folder.

    Args:
        path: a folder holding metrics.jsonl and, optionally, config.json.

    Returns:
        The run's complete records, one per round (the last one kept if a round repeats).

    Raises:
        ReportError: the folder or its metrics.jsonl is missing, holds no complete record,
            or a record has a `format` other than METRICS_FORMAT.
    """
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run folder {str(path)!r} does not exist")
    metrics = path / METRICS
    if not metrics.is_file():
        raise ReportError(f"run folder {str(path)!r} has no {METRICS}")
    records, warnings = read_records(metrics)
    if not records:
        raise ReportError(f"{metrics} holds no complete round record" + (f" ({warnings[0]})" if warnings else ""))
    config, config_warning = read_config(path / CONFIG)
    return Run(path, records, config, warnings + ([config_warning] if config_warning else []))


def read_records(metrics: Path) -> tuple[list[dict], list[str]]:
    """Complete, known-format records of metrics.jsonl by round, and a warning per line skipped."""
    by_round: dict[int, dict] = {}
    warnings: list[str] = []
    lines = metrics.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{metrics} line {number}"
        record, skipped = _decode(raw)
        if skipped:
            last = number == len(lines)  # no newline after it: the writer was cut off mid-line
            what = "truncated last line" if last and record is None else "a truncated record on line"
            warnings.append(f"skipped {what} {number} of {metrics} ({skipped} bytes, not complete JSON)")
        if record is None:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            warnings.append(f"skipped {where}: not a round record")
            continue
        if record.get("format") != METRICS_FORMAT:
            raise ReportError(f"{where}: unknown metrics format {record.get('format')!r}; "
                              f"this edgeftl reads format {METRICS_FORMAT}")
        if record["round"] in by_round:
            warnings.append(f"round {record['round']} appears twice in {metrics}; kept line {number}")
        by_round[record["round"]] = _normalise(record)
    return [by_round[k] for k in sorted(by_round)], warnings


def _decode(raw: bytes) -> tuple[object | None, int]:
    """(value, bytes skipped). A coordinator resumed after a kill appends its next record to the
    cut-off line, so a bad line may end in a complete record: the outermost `{` that parses."""
    try:
        return json.loads(raw), 0
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    start = raw.find(b'{"', 1)
    while start > 0:
        try:
            return json.loads(raw[start:]), start
        except (json.JSONDecodeError, UnicodeDecodeError):
            start = raw.find(b'{"', start + 1)
    return None, len(raw)


def read_config(path: Path) -> tuple[dict, str | None]:
    """config.json with its values parsed ("0.5" -> 0.5, "None" -> None); {} when absent."""
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"ignored {path}: {exc}"
    if not isinstance(data, dict):
        return {}, f"ignored {path}: not a JSON object"
    return {k: {n: _parse(v) for n, v in s.items()} if isinstance(s, dict) else s for k, s in data.items()}, None


def _parse(value: object) -> object:
    """simulate writes str(value) for every setting; turn those strings back into values."""
    if not isinstance(value, str):
        return value
    if value in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _normalise(record: dict) -> dict:
    """Values the report can use (records.clean), and device platform keys as `platform_<name>`,
    however many times the agent prefixed them."""
    devices = clean(record)["devices"]
    for device, metrics in list(devices.items()):
        fixed = {}
        for key, value in metrics.items():
            while key.startswith("platform_platform_"):
                key = key[len("platform_"):]
            fixed[key] = value
        devices[device] = fixed
    return record
