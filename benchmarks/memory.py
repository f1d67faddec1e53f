"""Helpers the benchmarks share: peak resident memory of one call (Linux /proc; each benchmark measures a
mode in a fresh process, so the peak over its first generation is that mode's own), modes timed taking
turns in one process, and a benchmark's child process whose last output line is JSON."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_rss(fn) -> dict:
    """Run ``fn()``; the peak RSS over it (MB) and that peak's growth over the RSS just before it."""
    before = _kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    except OSError:
        pass
    fn()
    peak = _kb("VmHWM")
    return {"peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024}


def interleaved_medians(generate, modes, repeats: int) -> dict:
    """One warm-up call of ``generate(mode)`` per mode, then ``repeats`` rounds with the modes taking turns
    (so a busy moment hits all modes alike); the median seconds per mode."""
    for mode in modes:
        generate(mode)
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            t0 = time.perf_counter()
            generate(mode)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def child(script: str, *args: str):
    """Run ``python script args...`` in a fresh process; its last output line, parsed as JSON."""
    run = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])
