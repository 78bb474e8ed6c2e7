"""Wall time of ``ldmkit quickstart --quick`` (the README's "66 s"), or of the full quickstart, from nothing.

    python benchmarks/quickstart_time.py [--runs 3] [--full] [--threads N] [-- EXTRA QUICKSTART ARGS]

Each run starts in a fresh temporary folder (nothing cached: data, VAE, teacher, distillation and evaluation
all run; ldmkit's own cache LDMKIT_CACHE points into it too) as its own process, one after the other, and is
timed from the outside (process start to exit, Python and import time included: what a user waits). Prints
every run, the median and each stage's median (the report's ``stage_seconds``), with the machine (CPU
model, cores, torch) and the load average before each run: a figure "measured alone" needs a load near 0.
The full quickstart takes about 15 minutes per run on a 2-core CPU; ``--quick`` about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY_LOAD = 0.5  # a 1-minute load average above this before a run: other work shared the cores


def machine() -> str:
    """CPU model, logical cores, torch version (the facts a timing needs next to it)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, Python {platform.python_version()}"


def one_run(args: argparse.Namespace, extra: list[str]) -> tuple[float, dict[str, float], float]:
    """(wall seconds, stage seconds from report.json, 1-minute load average before the run)."""
    with tempfile.TemporaryDirectory(prefix="ldmkit-quickstart-time-") as tmp:
        out = Path(tmp) / "quickstart"
        env = {**os.environ, "LDMKIT_CACHE": str(Path(tmp) / "cache")}
        if args.threads:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "ldmkit", "quickstart", "--out", str(out), *([] if args.full else ["--quick"])]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        r = subprocess.run([*cmd, *extra], env=env, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).splitlines()[-20:])
            raise SystemExit(f"{' '.join(cmd[2:])} failed (exit {r.returncode}):\n{tail}")
        report = json.loads((out / "report.json").read_text())
        return wall, {k: float(v) for k, v in report.get("stage_seconds", {}).items()}, load


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="Runs, one after the other (the median is printed).")
    p.add_argument("--full", action="store_true", help="Time the full quickstart instead of --quick (~15 min a run).")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs; default: as set here.")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    what = "ldmkit quickstart" + ("" if args.full else " --quick") + "".join(f" {a}" for a in extra)
    threads = args.threads or os.environ.get("OMP_NUM_THREADS") or "torch's default"
    print(f"{what}: {args.runs} run(s) from an empty folder; {machine()}; threads: {threads}", flush=True)
    walls, stages, loads = [], [], []
    for i in range(args.runs):
        wall, stage, load = one_run(args, extra)
        walls.append(wall)
        stages.append(stage)
        loads.append(load)
        per_stage = ", ".join(f"{k} {v:.1f}" for k, v in stage.items())
        print(f"run {i + 1}: {wall:.1f} s (load average before: {load:.2f}; stages, s: {per_stage})", flush=True)
    print(f"median wall time: {statistics.median(walls):.1f} s (min {min(walls):.1f}, max {max(walls):.1f})")
    if max(loads) > BUSY_LOAD:
        print(f"note: the machine was busy (load average up to {max(loads):.2f}): not a figure measured alone")
    names = list(dict.fromkeys(k for s in stages for k in s))
    print(
        "median stage seconds: "
        + ", ".join(f"{k} {statistics.median(s[k] for s in stages if k in s):.1f}" for k in names)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
