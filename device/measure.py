"""What a device run cost, measured from the OS: memory, time, bytes loaded, the platform.

Memory is the resident set size of this process, as the kernel counts it. ONNX Runtime's native
allocations are invisible to `tracemalloc`, so Python-level tracing would undercount them.
Every function returns plain numbers; `run_metrics` gathers them into one flat dict with the
unit in each key name (`device/files.py` `append_jsonl` appends them to a file).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

MIB = 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    `ru_maxrss` is in KiB on Linux and in bytes on macOS. Linux keeps RSS in per-CPU counters
    that are summed lazily, so `ru_maxrss` and /proc's VmHWM / VmRSS can disagree by a few
    pages; the peak is the largest of them. It is monotonic: a process cannot measure the peak
    of a later, smaller workload, which is why `plan` probes in fresh processes.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen = [round(peak * (1 if sys.platform == "darwin" else 1024) / MIB, 1)]
    seen += [v for v in (proc_status_mib("VmHWM"), proc_status_mib("VmRSS")) if v is not None]
    return max(seen)


def proc_status_mib(key: str) -> float | None:
    """A `/proc/self/status` memory line in MiB (VmRSS: resident now, VmHWM: peak), or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key and value.strip().endswith("kB"):
            return round(int(value.split()[0]) / 1024, 1)
    return None


def rss_mib() -> float:
    """Resident set size now, MiB (falls back to the peak where /proc is missing)."""
    current = proc_status_mib("VmRSS")
    return current if current is not None else peak_rss_mib()


def total_memory_mib() -> float | None:
    """Physical memory of the machine, MiB (/proc/meminfo, else sysconf), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB, 1)
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_mib() -> float | None:
    """Memory the machine can still give a new process without swapping, MiB (/proc/meminfo's
    MemAvailable), or None where that is not known (off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def platform_info() -> dict[str, object]:
    """Where the numbers were measured: CPU architecture, OS, core count, memory.

    The one description of a machine: devices send it with their metrics, and the benchmark
    scripts (tools/benchdoc.py) derive their `Machine:` lines from it.
    """
    return {
        "platform_machine": platform.machine(),
        "platform_system": platform.system(),
        "platform_release": platform.release(),
        "platform_python": platform.python_version(),
        "platform_cpu_count": os.cpu_count(),
        "platform_total_memory_mib": total_memory_mib(),
    }


def cpu_model() -> str:
    """The CPU's model name, for reports (not in `platform_info`: devices do not send it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cpus() -> int:
    """CPUs this process may run on (`nproc`): fewer than `platform_cpu_count` in a container or under taskset."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def files_bytes(paths: Iterable[Path]) -> int:
    """Sum of the sizes of the given files, bytes (each counted once)."""
    return sum(Path(p).stat().st_size for p in {Path(p).resolve() for p in paths})


def memory_metrics() -> dict[str, float | None]:
    """Peak and current resident memory of this process, MiB."""
    return {
        "peak_rss_mib": peak_rss_mib(),
        "vm_hwm_mib": proc_status_mib("VmHWM"),
        "vm_rss_mib": proc_status_mib("VmRSS"),
    }


def run_metrics(step_times_s: list[float], samples: int, rss_after_load: float | None,
                model_bytes_loaded: int | None) -> dict[str, object]:
    """One run's flat record: memory, step time, throughput, bytes loaded, platform.

    Args:
        step_times_s: wall time of each training step (forward, backward, optimizer), seconds.
        samples: training samples processed in those steps.
        rss_after_load: resident memory right after the bundle was loaded, MiB.
        model_bytes_loaded: bytes of the bundle files the runtime opened.

    Returns:
        Keys with units in their names; timing keys are None when no step ran.
    """
    busy = sum(step_times_s)
    record: dict[str, object] = {
        "median_step_time_s": round(statistics.median(step_times_s), 4) if step_times_s else None,
        "samples_per_s": round(samples / busy, 2) if busy > 0 else None,
        "rss_after_load_mib": rss_after_load,
        "model_bytes_loaded": model_bytes_loaded,
    }
    record.update(memory_metrics())
    if rss_after_load is not None:  # counters are approximate (see peak_rss_mib); a peak is never below a reading
        peak = record["peak_rss_mib"]
        record["peak_rss_mib"] = max(peak, rss_after_load) if isinstance(peak, (int, float)) else rss_after_load
    record.update(platform_info())
    return record

