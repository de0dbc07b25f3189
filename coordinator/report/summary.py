"""The numbers a report states: totals, the fp32 comparison, configuration and device rows.

Pure functions of loaded runs; plots and HTML format what these return.
"""

from __future__ import annotations

from edgeftl.coordinator.report.load import Run
from edgeftl.coordinator.report.targets import final_accuracy, reach

FP32_BYTES = 4  # an uncompressed update sends every trainable value as float32
KIB, MIB = 1024, 1024 * 1024
PLATFORM_KEYS = ("platform_machine", "platform_system", "platform_release", "platform_cpu_count",
                 "platform_total_memory_mib", "platform_python")


def fp32_update_bytes(run: Run) -> int | None:
    """Bytes of one uncompressed fp32 update (or global delta): 4 x trainable parameters."""
    return FP32_BYTES * run.trainable_params if run.trainable_params else None


def fmt_bytes(value: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    for unit, size in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.3g} {unit}" if scaled < 1000 else f"{scaled:.0f} {unit}"
    return f"{value:.0f} B"


def totals(run: Run) -> dict[str, float | int | None]:
    """Whole-run figures with units in the key names."""
    records = run.records
    updates = sum(r.get("updates_received", 0) for r in records)
    bytes_up = sum(r.get("bytes_up", 0) for r in records)
    fp32 = fp32_update_bytes(run)
    accuracy = [r["accuracy"] for r in records if isinstance(r.get("accuracy"), (int, float))]
    perplexity = [r["perplexity"] for r in records if isinstance(r.get("perplexity"), (int, float))]
    final = final_accuracy(records)
    # What reaching the final accuracy cost: a run that gets there early could have stopped there.
    to_final = reach(records, final) if final is not None else None
    return {
        "rounds": len(records),
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max(accuracy) if accuracy else None,
        "final_perplexity": perplexity[-1] if perplexity else None,
        "best_perplexity": min(perplexity) if perplexity else None,  # lower is better
        "final_loss": records[-1].get("loss"),
        "updates": updates,
        "updates_late": sum(r.get("updates_late", 0) for r in records),
        "updates_rejected": sum(r.get("updates_rejected", 0) for r in records),
        "updates_failed": sum(r.get("updates_failed", 0) for r in records),
        "bytes_up": bytes_up,
        "bytes_down": sum(r.get("bytes_down", 0) for r in records),
        "bytes_up_per_update": bytes_up / updates if updates else None,
        "fp32_bytes_up": fp32 * updates if fp32 else None,
        "rounds_to_final_accuracy": to_final.rounds if to_final else None,
        "bytes_up_to_final_accuracy": to_final.bytes_up if to_final else None,
        "bytes_down_to_final_accuracy": to_final.bytes_down if to_final else None,
        "compression_ratio": fp32 * updates / bytes_up if fp32 and bytes_up else None,
        "max_device_peak_rss_mib": max((r.get("device_peak_rss_mib", 0.0) for r in records), default=0.0),
        "wall_s": sum(r.get("wall_s", 0.0) for r in records),
    }


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """(label, formatted value) for the summary table."""
    t = totals(run)
    ratio = f"{t['compression_ratio']:.1f}x less than fp32" if t["compression_ratio"] else "- (no config.json)"
    per_update = fmt_bytes(t["bytes_up_per_update"]) if t["bytes_up_per_update"] else "-"
    return [
        ("rounds recorded", str(t["rounds"])),
        *measure_rows(t),
        ("final test loss", f"{t['final_loss']:.4f}" if isinstance(t["final_loss"], (int, float)) else "-"),
        ("updates received / late / rejected / failed",
         f"{t['updates']} / {t['updates_late']} / {t['updates_rejected']} / {t['updates_failed']}"),
        ("total bytes up (devices → coordinator)", fmt_bytes(t["bytes_up"])),
        ("total bytes down (to devices)", fmt_bytes(t["bytes_down"])),
        ("bytes per update (uplink)", per_update),
        ("to reach the final accuracy: rounds, bytes up / down", to_final_text(t)),
        ("uplink compression vs fp32", ratio),
        ("max device peak memory", f"{t['max_device_peak_rss_mib']:.0f} MiB"),
        ("wall time of the rounds", f"{t['wall_s']:.1f} s"),
    ]


def to_final_text(t: dict) -> str:
    """'4 rounds, 1.2 MiB up / 3.4 MiB down': what the first round at the final accuracy had cost."""
    if t["rounds_to_final_accuracy"] is None:
        return "-"
    return (f"{t['rounds_to_final_accuracy']} rounds, {fmt_bytes(t['bytes_up_to_final_accuracy'])} up / "
            f"{fmt_bytes(t['bytes_down_to_final_accuracy'])} down")


def measure_rows(t: dict) -> list[tuple[str, str]]:
    """Held-out perplexity rows for a causal LM's run, accuracy rows for anything else."""
    if t["final_perplexity"] is not None:
        return [("final held-out perplexity", f"{t['final_perplexity']:.2f}"),
                ("best held-out perplexity", f"{t['best_perplexity']:.2f}")]
    pct = lambda v: f"{v:.1%}" if v is not None else "-"
    return [("final test accuracy", pct(t["final_accuracy"])), ("best test accuracy", pct(t["best_accuracy"]))]


def config_rows(run: Run) -> list[tuple[str, str]]:
    """(label, value) for the configuration table; '-' where config.json does not say."""
    s = run.setting
    devices = s("simulation", "devices") or max((r.get("devices_online", 0) for r in run.records), default=0)
    rounds = s("rounds", "rounds")
    steps, epochs = s("rounds", "steps"), s("rounds", "epochs")
    local = f"{steps} steps" if steps else (f"{epochs} epochs" if epochs else "-")
    return [
        ("model", _text(s("bundle", "model_id"))),
        ("quantization", _text(s("bundle", "quantization"))),
        ("adapter", adapter_text(s("bundle", "adapter"))),
        ("trainable parameters", f"{run.trainable_params:,}" if run.trainable_params else "-"),
        ("uplink codec", run.codec),
        ("downlink codec", _text(s("rounds", "downlink"))),
        ("strategy", _text(s("rounds", "strategy"))),
        ("devices", str(devices)),
        ("Dirichlet alpha", _text(s("simulation", "alpha"))),
        ("rounds (configured / recorded)", f"{_text(rounds)} / {len(run.records)}"),
        ("local training per round", f"{local}, batch {_text(s('rounds', 'batch'))}, lr {_text(s('rounds', 'lr'))}"),
        ("round deadline", f"{s('rounds', 'deadline_s')} s" if s("rounds", "deadline_s") else "-"),
    ]


def adapter_text(adapter: object) -> str:
    if not isinstance(adapter, dict):
        return _text(adapter)
    text = f"{adapter.get('kind', '?')} r={adapter.get('rank', '?')} alpha={adapter.get('alpha', '?')}"
    if adapter.get("targets"):
        text += " on " + ", ".join(map(str, adapter["targets"]))
    if adapter.get("train_layers"):
        text += f" (top {adapter['train_layers']} blocks)"
    return text


def device_rows(run: Run) -> list[dict[str, object]]:
    """Per device: platform, peak memory (max over rounds), training time, updates sent."""
    rows = []
    for device in run.devices():
        seen = [r["devices"][device] for r in run.records if device in r["devices"]]
        times = [m["train_time_s"] for m in seen if isinstance(m.get("train_time_s"), (int, float))]
        row: dict[str, object] = {"device": device, "platform": platform_label(seen[-1]), "updates": len(seen),
                                  "peak_rss_mib": max((m.get("peak_rss_mib", 0.0) for m in seen), default=0.0),
                                  "mean_train_time_s": sum(times) / len(times) if times else None,
                                  "max_train_time_s": max(times, default=None)}
        extra = sorted({k for m in seen for k in m if k.endswith("_mib") and ("gpu" in k or "unified" in k)})
        for key in extra:  # Jetson-class boards: GPU / unified memory in use, when the device reports it
            row[key] = max((m.get(key) or 0.0 for m in seen), default=0.0)
        rows.append(row)
    return rows


def platform_label(metrics: dict) -> str:
    """'x86_64 Linux 6.1, 2 CPUs, 23.5 GiB' from a device's platform_* metrics."""
    machine, system = metrics.get("platform_machine"), metrics.get("platform_system")
    release = str(metrics.get("platform_release") or "").split("-")[0]
    parts = [" ".join(str(p) for p in (machine, system, release) if p)]
    if metrics.get("platform_cpu_count"):
        parts.append(f"{metrics['platform_cpu_count']} CPUs")
    if isinstance(metrics.get("platform_total_memory_mib"), (int, float)):
        parts.append(f"{metrics['platform_total_memory_mib'] / 1024:.1f} GiB")
    return ", ".join(p for p in parts if p) or "unknown platform"


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)
