"""Reports of finished runs: read metrics.jsonl, draw the figures, write one HTML page.

    report = write_report([Path("runs/demo")], budget_mib=512)
    print(report.html)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeftl.coordinator.report.load import ReportError, Run, load_run
from edgeftl.device.files import atomic_write

__all__ = ["Report", "ReportError", "Run", "load_run", "write_report"]


@dataclass
class Report:
    """What `write_report` wrote, and what it skipped reading the runs."""

    html: Path
    images: list[Path]
    warnings: list[str]


def write_report(run_dirs: list[Path], out: Path | None = None, budget_mib: float | None = None) -> Report:
    """Write the HTML report of one run, or of several runs overlaid, with its PNGs beside it.

    Args:
        run_dirs: run folders, each holding metrics.jsonl (and config.json from `simulate`).
        out: the HTML file; default RUN_DIR/report.html for one run, the first run's
            report-compare.html for several.
        budget_mib: a device memory budget drawn over the peak-memory bars.

    Returns:
        The paths written and a warning per line of metrics skipped.

    Raises:
        ReportError: a run folder is missing, holds no complete record, or an unknown format.
    """
    from edgeftl.coordinator.report.html import render
    from edgeftl.coordinator.report.plots import all_figures

    if not run_dirs:
        raise ReportError("give at least one run folder")
    if budget_mib is not None and not budget_mib > 0:
        raise ReportError(f"--budget-mib must be positive, got {budget_mib!r}")
    runs = [load_run(Path(d)) for d in run_dirs]
    default = "report.html" if len(runs) == 1 else "report-compare.html"
    out = Path(out) if out is not None else runs[0].path / default
    warnings = [w for run in runs for w in run.warnings]
    figures = all_figures(runs, out.parent / out.stem, budget_mib)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, render(runs, figures, warnings), mode=0o644)  # a page to open and share
    return Report(out, [f.path for f in figures], warnings)
