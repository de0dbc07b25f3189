"""One self-contained HTML page: tables, warnings and the PNGs inlined as base64 data URIs.

No script, no stylesheet or font from the network: the file opens offline and can be mailed.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

from edgeftl.coordinator.report.load import Run
from edgeftl.coordinator.report.plots import Figure
from edgeftl.coordinator.report.summary import config_rows, device_rows, summary_rows

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 24px auto;
       max-width: 1240px; padding: 0 16px; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 32px; }
.meta { color: #666; font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f4f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tables { display: flex; gap: 32px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 16px 0 28px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; margin-top: 4px; }
.warn { background: #fff6e0; border-left: 4px solid #e0a000; padding: 8px 12px; font-size: 14px; }
"""


def render(runs: list[Run], figures: list[Figure], warnings: list[str]) -> str:
    """The whole page as a string."""
    title = "edgeftl run: " + runs[0].name if len(runs) == 1 else "edgeftl runs: " + ", ".join(r.name for r in runs)
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             "<p class='meta'>" + " · ".join(_e(str(r.path)) for r in runs) + f" · report written {made}</p>"]
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
        parts.append(f"<div class='warn'><strong>Skipped while reading:</strong><ul>{items}</ul></div>")
    parts.append("<div class='tables'>")
    parts.append(_section("Summary", _table(runs, summary_rows)))
    parts.append(_section("Configuration", _table(runs, config_rows)))
    parts.append("</div>")
    for figure in figures:
        parts.append(_figure(figure))
    parts.append("<h2>Devices</h2>")
    parts.extend(_devices(run, len(runs) > 1) for run in runs)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _section(heading: str, body: str) -> str:
    return f"<div><h2>{_e(heading)}</h2>{body}</div>"


def _table(runs: list[Run], rows_of) -> str:
    """Label column, then one value column per run."""
    columns = [rows_of(run) for run in runs]
    head = "<tr><th></th>" + "".join(f"<th>{_e(run.label)}</th>" for run in runs) + "</tr>"
    body = []
    for i, (label, _) in enumerate(columns[0]):
        cells = "".join(f"<td>{_e(column[i][1])}</td>" for column in columns)
        body.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    return (f"<figure><h2>{_e(figure.title)}</h2><img alt='{_e(figure.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(figure.caption)} ({_e(figure.path.name)})</figcaption></figure>")


def _devices(run: Run, named: bool) -> str:
    rows = device_rows(run)
    extra = sorted({k for row in rows for k in row if k.endswith("_mib") and k != "peak_rss_mib"})
    head = ["device", "platform", "updates", "peak RSS (MiB)", "mean training (s)", "slowest round (s)",
            *[k.removesuffix("_mib").replace("_", " ") + " (MiB)" for k in extra]]
    lines = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [_e(row["device"]), _e(row["platform"])]
        numbers = [str(row["updates"]), f"{row['peak_rss_mib']:.0f}", _num(row["mean_train_time_s"], 2),
                   _num(row["max_train_time_s"], 2), *[_num(row.get(k), 0) for k in extra]]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                     + "".join(f"<td class='num'>{n}</td>" for n in numbers) + "</tr>")
    lines.append("</table>")
    return (f"<h3>{_e(run.label)}</h3>" if named else "") + "".join(lines)


def _num(value: object, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
