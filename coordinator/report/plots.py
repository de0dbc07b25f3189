"""The report's figures as PNG files (matplotlib, Agg): one function per figure.

Every function takes the loaded runs (one or several, overlaid in one colour each) and the
PNG path, and returns a `Figure` naming what it drew. Bytes are plotted on a log2 axis in
binary units so an int8 or top-k run and its fp32 equivalent are both readable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from edgeftl.coordinator.report.load import Run
from edgeftl.coordinator.report.summary import fmt_bytes, fp32_update_bytes, platform_label
from edgeftl.coordinator.report.targets import curve

DPI = 110
STYLE = {"font.size": 12, "axes.titlesize": 14, "axes.labelsize": 12, "legend.fontsize": 10,
         "xtick.labelsize": 11, "ytick.labelsize": 11, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False}
COLORS = plt.get_cmap("tab10").colors
# One marker per run, each smaller than the last, so runs with equal values stay visible on top of each other.
MARKERS = [{"marker": m, "ms": 9 - 1.2 * i, "ls": "-"} for i, m in enumerate("osD^vP")]
DOTTED = {"ls": ":", "lw": 2}


@dataclass
class Figure:
    """One PNG of the report: its file, heading and a sentence on how to read it."""

    path: Path
    title: str
    caption: str


def all_figures(runs: list[Run], stem: Path, budget_mib: float | None) -> list[Figure]:
    """Draw every figure as `<stem>-<name>.png`."""
    out = stem.parent
    out.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        language_model = any("perplexity" in r for run in runs for r in run.records)
        measured = (perplexity_loss(runs, out / f"{stem.name}-perplexity.png") if language_model
                    else accuracy_loss(runs, out / f"{stem.name}-accuracy.png"))
        return [measured,
                measure_against_bytes(runs, out / f"{stem.name}-accuracy-bytes.png", language_model),
                cumulative_bytes(runs, out / f"{stem.name}-bytes-cumulative.png"),
                device_bytes(runs, out / f"{stem.name}-bytes-per-device.png"),
                peak_memory(runs, out / f"{stem.name}-memory.png", budget_mib),
                train_time(runs, out / f"{stem.name}-train-time.png")]


def accuracy_loss(runs: list[Run], path: Path) -> Figure:
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for color, style, run in zip(COLORS, MARKERS * 10, runs):
        rounds = [r["round"] for r in run.records if "accuracy" in r]
        acc.plot(rounds, [100 * r["accuracy"] for r in run.records if "accuracy" in r], color=color,
                 label=run.label, **style)
        loss.plot(rounds, [r.get("loss", math.nan) for r in run.records if "accuracy" in r], color=color,
                  label=run.label, **style)
    _axes(acc, "Test accuracy per round", "accuracy (%)")
    _axes(loss, "Test loss per round", "loss (cross-entropy)")
    if not any("accuracy" in r for run in runs for r in run.records):
        acc.text(0.5, 0.5, "not evaluated (coordinator ran without --eval)", ha="center", transform=acc.transAxes)
    _legend_below(fig, acc)
    return _save(fig, path, "Test accuracy and loss", "The global model on the held-out split after each round.")


def perplexity_loss(runs: list[Run], path: Path) -> Figure:
    fig, (ppl, loss) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for color, style, run in zip(COLORS, MARKERS * 10, runs):
        scored = [r for r in run.records if "perplexity" in r]
        rounds = [r["round"] for r in scored]
        ppl.plot(rounds, [r["perplexity"] for r in scored], color=color, label=run.label, **style)
        loss.plot(rounds, [r.get("loss", math.nan) for r in scored], color=color, label=run.label, **style)
    _axes(ppl, "Held-out perplexity per round", "perplexity (exp of loss per token)")
    _axes(loss, "Held-out loss per round", "loss (nats per predicted token)")
    _legend_below(fig, ppl)
    return _save(fig, path, "Held-out perplexity and loss",
                 "The global language model on the held-out texts after each round; lower is better.")


def measure_against_bytes(runs: list[Run], path: Path, language_model: bool = False) -> Figure:
    """Accuracy (perplexity for a language model) against cumulative upload and download bytes.

    The comparison issue 16 asks for: a codec that learns slowly moves right as it sends more
    rounds, so the run whose curve is further left reaches an accuracy for fewer bytes.
    """
    key, label = ("perplexity", "perplexity") if language_model else ("accuracy", "accuracy (%)")
    scale = 1 if language_model else 100
    fig, (up, down) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for color, style, run in zip(COLORS, MARKERS * 10, runs):
        for ax, direction in ((up, "bytes_up"), (down, "bytes_down")):
            points = [(sent, score) for sent, score in curve(run.records, direction, key) if sent > 0]  # log axis
            ax.plot([x for x, _ in points], [scale * y for _, y in points], color=color, label=run.label, **style)
    for ax, what in ((up, "uploaded (devices → coordinator)"), (down, "downloaded (to the devices)")):
        _axes(ax, f"Held-out {key} against bytes {what.split(' ')[0]}", label, xlabel=f"bytes {what}, cumulative")
        if ax.lines and any(len(line.get_xdata()) for line in ax.lines):
            ax.set_xscale("log", base=2)  # ticks at powers of 2: whole KiB / MiB labels
            ax.xaxis.set_major_locator(LogLocator(base=2, numticks=8))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.text(0.5, 0.5, "not evaluated (coordinator ran without --eval)", ha="center", transform=ax.transAxes)
    _legend_below(fig, up)
    return _save(fig, path, f"Held-out {key} against bytes sent",
                 "Each point is a round: the global model's score after it, against the bytes all devices had sent "
                 "(left) and received (right) by then, log scale. Further left is cheaper for the same score.")


def cumulative_bytes(runs: list[Run], path: Path) -> Figure:
    fig, (up, down) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    ups, downs = [], []
    for color, style, run in zip(COLORS, MARKERS * 10, runs):
        rounds = [r["round"] for r in run.records]
        ups.append((rounds, _cumsum(r.get("bytes_up", 0) for r in run.records), run.label, color, style))
        downs.append((rounds, _cumsum(r.get("bytes_down", 0) for r in run.records), run.label, color, style))
    for series, key in ((ups, "updates_received"), (downs, "updates_received")):
        series.extend(_fp32_series(runs, lambda run, fp32, key=key: _cumsum(fp32 * r.get(key, 0) for r in run.records)))
    _bytes_axes(up, ups, "Uplink so far (devices → coordinator)", "cumulative")
    _bytes_axes(down, downs, "Downlink so far (to the devices)", "cumulative")
    _legend_below(fig, up)
    return _save(fig, path, "Cumulative bytes", "Payload bytes over the broker, summed over rounds (log scale); "
                 "dotted: the same updates, and one global per update, as uncompressed fp32.")


def device_bytes(runs: list[Run], path: Path) -> Figure:
    fig, (up, down) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    ups, downs = [], []
    for color, style, run in zip(COLORS, MARKERS * 10, runs):
        sent = [r for r in run.records if r.get("updates_received")]
        rounds = [r["round"] for r in sent]
        ups.append((rounds, [r.get("bytes_up", 0) / r["updates_received"] for r in sent], run.label, color, style))
        downs.append((rounds, [r.get("bytes_down", 0) / r["updates_received"] for r in sent], run.label, color,
                      style))
    for series in (ups, downs):
        series.extend(_fp32_series(runs, lambda run, fp32: [fp32] * len(run.records)))
    _bytes_axes(up, ups, "Uplink per device per round", "per update")
    _bytes_axes(down, downs, "Downlink per device per round", "per device")
    _legend_below(fig, up)
    return _save(fig, path, "Bytes per device per round", "Mean over the devices that sent an update (log scale); "
                 "dotted: one uncompressed fp32 vector (4 bytes x trainable parameters). A device's first round "
                 "includes the full global it syncs from.")


def peak_memory(runs: list[Run], path: Path, budget_mib: float | None) -> Figure:
    devices = sorted({d for run in runs for d in run.devices()})
    platforms = {d: _platform(runs, d) for d in devices}
    shared = len(set(platforms.values())) == 1
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 + 0.9 * len(devices) * max(1, len(runs)) ** 0.5), 4.6),
                           layout="constrained")
    width = 0.8 / len(runs)
    for i, (color, run) in enumerate(zip(COLORS, runs)):
        peaks = [max((r["devices"][d].get("peak_rss_mib", 0.0) for r in run.records if d in r["devices"]),
                     default=0.0) for d in devices]
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(devices))]
        bars = ax.bar(xs, peaks, width * 0.92, color=color, label=run.label)
        if len(devices) * len(runs) <= 24:
            ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=9)
    if budget_mib:
        ax.axhline(budget_mib, color="crimson", ls="--", lw=2, label=f"budget {budget_mib:g} MiB")
    ax.set_xticks(range(len(devices)), [d if shared else f"{d}\n{platforms[d]}" for d in devices],
                  rotation=0 if len(devices) <= 8 else 45, ha="center" if len(devices) <= 8 else "right",
                  fontsize=11 if shared else 8)
    title = "Peak memory (RSS) per device" + (f"\n{platforms[devices[0]]}" if shared and devices else "")
    _axes(ax, title, "peak RSS (MiB)", xlabel="device")
    ax.margins(y=0.12)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path, "Device memory", "Peak resident set size of each device process, as the OS counts it "
                 "(max over rounds)" + (", against the memory budget." if budget_mib else "."))


def train_time(runs: list[Run], path: Path) -> Figure:
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs) + 0.8), sharex=True, layout="constrained",
                             squeeze=False)
    slowest = 0.0
    for ax, run in zip(axes[:, 0], runs):
        for color, device in zip(COLORS * 10, run.devices()):
            points = [(r["round"], r["devices"][device].get("train_time_s")) for r in run.records
                      if device in r["devices"]]
            points = [(x, y) for x, y in points if isinstance(y, (int, float))]
            slowest = max([slowest, *(y for _, y in points)])
            ax.plot([x for x, _ in points], [y for _, y in points], "o-", color=color, label=device, ms=5)
        _axes(ax, f"Local training time per round — {run.label}", "training time (s)", xlabel="")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(run.devices()) // 12)
    for ax in axes[:, 0]:  # one scale for every run, so their stragglers compare
        ax.set_ylim(0, slowest * 1.15 or 1)
    axes[-1, 0].set_xlabel("round")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path, "Training time per device", "Seconds each device spent training in each round; a line "
                 "above the others is a straggler the round waits for.")


# ---- helpers ------------------------------------------------------------------------------------
def _axes(ax, title: str, ylabel: str, xlabel: str = "round") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlabel == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


Series = tuple[list, list, str, object, dict]  # (rounds, values, label, colour, Line2D style)


def _fp32_series(runs: list[Run], values) -> list[Series]:
    """Each run's fp32-equivalent line, less those another run's line already covers; a single
    remaining line is drawn in grey (it applies to every run)."""
    lines = []
    for color, run in zip(COLORS, runs):
        fp32 = fp32_update_bytes(run)
        if fp32:
            lines.append(([r["round"] for r in run.records], values(run, fp32), f"{run.name}: fp32", color, DOTTED))
    kept: list[Series] = []
    for line in sorted(lines, key=lambda line: -len(line[0])):
        n = len(line[0])
        if not any(other[0][:n] == line[0] and other[1][:n] == line[1] for other in kept):
            kept.append(line)
    if len(kept) == 1:
        kept = [(kept[0][0], kept[0][1], "fp32 equivalent", "dimgray", DOTTED)]
    return kept


def _legend_below(fig, ax) -> None:
    """One legend for a row of panels, under them, so it never covers a line."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), frameon=False)


def _bytes_axes(ax, series: list[Series], title: str, what: str) -> None:
    """Plot byte series in one binary unit (B/KiB/MiB/GiB chosen by the largest value), log y."""
    peak = max((v for _, values, *_ in series for v in values), default=0)
    unit, size = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if peak >= s), ("B", 1))
    for rounds, values, label, color, style in series:
        ax.plot(rounds, [v / size for v in values], color=color, label=label, **style)
    _axes(ax, title, f"{unit} {what}")
    positive = [v / size for _, values, *_ in series for v in values if v > 0]
    if positive:
        ax.set_yscale("log")
        low, high = min(positive), max(positive)
        ax.set_ylim(low / 1.6, high * 1.6)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        # Within about a decade the major ticks are too few: label 2x and 5x too.
        few = high / low < 100
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if few and _mantissa(v) in (2, 5) else ""))


def _mantissa(value: float) -> int:
    return round(value / 10 ** math.floor(math.log10(value)))


def _cumsum(values) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _platform(runs: list[Run], device: str) -> str:
    for run in runs:
        for record in reversed(run.records):
            if device in record["devices"]:
                return platform_label(record["devices"][device])
    return "unknown platform"


def _save(fig, path: Path, title: str, caption: str) -> Figure:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Figure(path, title, caption)
