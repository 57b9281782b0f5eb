"""Runs ``backfill-pipeline ARGS`` in this process while a thread samples its RSS every 50 ms against the
step running at that moment (read by walking the threads' frames), and writes each step's peak, and the
kernel's peak for the whole process (``VmHWM``, read as it exits), to the JSON file named by ``RSS_STEPS``.

``VmHWM`` counts this program's memory only. (The ``ru_maxrss`` a parent reads with ``wait4`` can instead
report the parent's own size: the child's pages before ``exec`` count towards it.)

usage: RSS_STEPS=out.json python bench/rss_sampler.py materialize --yes
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

STEPS = ("read_rows", "detect_rows", "enrich_rows", "embed_rows", "write_rows", "partition_coverage")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


ENDED = threading.Event()


def step_now() -> str:
    if ENDED.is_set():
        return "(after the command, exiting)"
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name in STEPS:
                return frame.f_code.co_name
            frame = frame.f_back  # type: ignore[assignment]
    return "(between steps)"


def sample(peaks: dict[str, float], path: str) -> None:
    last = time.monotonic()
    while True:
        step = step_now()
        peaks[step] = max(peaks.get(step, 0.0), rss_mib())
        if time.monotonic() - last > 0.25:
            with open(path, "w") as out:
                json.dump(peaks, out)
            last = time.monotonic()
        time.sleep(0.05)


def high_water_mib() -> float:
    """The kernel's peak RSS of this process's memory since it was executed (``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def finish(peaks: dict[str, float], path: str) -> None:
    time.sleep(0.2)  # a last sample
    peaks["peak RSS (VmHWM)"] = high_water_mib()
    with open(path, "w") as out:
        json.dump(peaks, out)


def main() -> int:
    from backfill_pipeline.cli import main as cli

    peaks: dict[str, float] = {}
    path = os.environ["RSS_STEPS"]
    atexit.register(lambda: finish(peaks, path))  # runs last: after the other exit handlers
    threading.Thread(target=sample, args=(peaks, path), daemon=True).start()
    try:
        return cli(sys.argv[1:])
    finally:
        import pyarrow as pa

        peaks["arrow pool at its largest"] = pa.default_memory_pool().max_memory() / 2**20
        ENDED.set()


if __name__ == "__main__":
    sys.exit(main())
