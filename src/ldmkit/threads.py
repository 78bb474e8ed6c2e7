"""Torch's CPU thread count follows the cores other work leaves idle (issue 26: a CPU shared with anything else).

On a 2-core machine one other busy process made a whole ``ldmkit quickstart --quick`` 10x slower with torch's
default 2 threads (README, "A CPU shared with other work"): every parallel region waits for the thread whose core
the other process holds. One thread on the core that is free runs at full speed. So, where the user has not
chosen a thread count, the ``ldmkit`` entry point enables a governor that the long loops (the training loop's
steps, evaluation batches) ``tick``: about once a second it reads how much CPU the rest of the machine used
since the last look (``/proc/stat`` minus this process and its children, e.g. data workers) and sets
``torch.set_num_threads`` to the cores left idle (at least 1, at most what torch started with). A change needs
two looks in a row that agree, so a short burst elsewhere does not flip it back and forth.

``torch.set_num_threads`` goes through ``omp_set_num_threads``, which sets the calling thread's own value: it is
called from the loop's thread (where torch's CPU kernels and the CPU autograd run), never from a background one.
No maintained library does this (psutil reads the counters; the decision and where to apply it are ldmkit's);
Linux only (``/proc``), elsewhere ``tick`` does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
INTERVAL = 1.0
"""Seconds between looks at the machine."""
AGREE = 2
"""Looks in a row that must want the same new thread count before it is set."""

_governor: Governor | None = None


class Governor:
    """The thread count from the idle cores; ``tick`` from the thread that runs torch's kernels."""

    def __init__(self, max_threads: int | None = None, *, stat: Path = PROC_STAT, clock=time.monotonic):
        """``max_threads``: the most it sets (None: what torch has at the first tick, i.e. its own default)."""
        self.max_threads = max_threads
        self.stat, self.clock = stat, clock
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = max_threads
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy s, own busy s)
        self._wanted: list[int] = []
        self.changes: list[tuple[float, int]] = []  # (wall, threads): what was set, for reports and tests

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = self.stat.read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        # cpu user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        ticks = [int(x) for x in fields[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / self.hz
        return self.clock(), busy, own_cpu_seconds(self.hz)

    def others(self) -> float | None:
        """Cores the rest of the machine kept busy since the last call (None: the first call, or no /proc)."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))

    def want(self, others: float) -> int:
        assert self.max_threads is not None
        return min(self.max_threads, max(1, self.cores - round(others)))

    def tick(self) -> int:
        """Look at the machine if INTERVAL has passed; set torch's threads when AGREE looks want a new count."""
        import torch

        if self.max_threads is None:
            self.max_threads = self.threads = max(1, torch.get_num_threads())
        if self._last is not None and self.clock() - self._last[0] < INTERVAL:
            return self.threads
        others = self.others()
        if others is None:
            return self.threads
        self._wanted = [*self._wanted, self.want(others)][-AGREE:]
        if len(self._wanted) == AGREE and len(set(self._wanted)) == 1 and self._wanted[0] != self.threads:
            self.threads = self._wanted[0]
            torch.set_num_threads(self.threads)
            self.changes.append((self.clock(), self.threads))
        return self.threads


def own_cpu_seconds(hz: float) -> float:
    """CPU seconds of this process (all its threads) and of its live children (data workers, ...)."""
    total = time.process_time()
    for pid in _children():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / hz  # utime, stime (fields 14, 15 of proc(5))
    return total


def _children() -> list[str]:
    pids: list[str] = []
    try:
        for task in Path("/proc/self/task").iterdir():
            pids += (task / "children").read_text().split()
    except OSError:
        pass
    return pids


def enable(environ=os.environ) -> Governor | None:
    """The entry point's choice: a governor unless the user set a thread count (OMP_NUM_THREADS /
    MKL_NUM_THREADS: theirs wins), opted out (LDMKIT_OPENMP_DEFAULTS=0) or there is no /proc/stat."""
    global _governor
    if any(k in environ for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return None
    if environ.get("LDMKIT_OPENMP_DEFAULTS", "1") == "0" or not PROC_STAT.is_file():
        return None
    _governor = Governor()  # no torch import here: `ldmkit --help` stays fast
    return _governor


def tick() -> None:
    """Called by long loops once per step or batch: cheap when no governor is enabled or no second has passed."""
    if _governor is not None:
        _governor.tick()
