"""Peak resident memory of one call, for the benchmarks (Linux /proc): each benchmark measures a mode
in a fresh process, so the peak over its first generation is that mode's own."""

from __future__ import annotations

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
