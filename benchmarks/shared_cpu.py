"""How ldmkit's CPU training runs beside other work: OpenMP wait policy and thread count (issue 26, item 4).

    python benchmarks/shared_cpu.py                 # microbenchmark + ldmkit quickstart --quick (about an hour)
    python benchmarks/shared_cpu.py --short         # microbenchmark only, fewer repeats (a few minutes)
    python benchmarks/shared_cpu.py --competitors python,torch --candidates ldmkit,passive,spin10k
    python benchmarks/shared_cpu.py --candidates torch,ldmkit --alone torch --rounds 1   # today vs the default

For each candidate setting (environment variables given to the measured process, so the OpenMP runtime
reads them when torch loads it) the same work is timed ALONE and BESIDE one competing busy process, in
one script, and printed side by side with the ratio beside / alone:

- micro: a training step of a small conv net (forward, backward, AdamW), median ms of ``--iters`` steps
  after warm-up, in a fresh process that applies ldmkit's entry-point defaults first (as ``ldmkit`` does);
- quickstart: ``python -m ldmkit quickstart --quick`` from an empty folder, wall seconds (skipped by --short).

Competitors: ``python`` (one Python busy loop: one core taken) and ``torch`` (a 2-thread torch matmul loop
at torch's own OpenMP defaults: two spinning threads, what a second training does). Candidates: ``torch``
(the OpenMP runtime's defaults: ldmkit's turned off), ``ldmkit`` (whatever src/ldmkit/cli.py OPENMP_DEFAULTS
holds now, and the thread governor of src/ldmkit/threads.py: torch's threads follow the idle cores),
``governor`` (the governor at libgomp's own spin), ``passive`` (OMP_WAIT_POLICY=PASSIVE), ``spin10k`` /
``spin100k`` (GOMP_SPINCOUNT: libgomp's spin before sleeping, 300000 when the policy is unset; these three with
OMP_NUM_THREADS = the cores, a fixed count, so no governor), ``1thread`` (OMP_NUM_THREADS=1), ``free``
(OMP_NUM_THREADS = cores in the affinity mask minus the 1-minute load average at start, at least 1). The inherited
OMP_* / GOMP_* / MKL_NUM_THREADS of this shell are removed from the measured processes, so every candidate
is what its name says; candidates other than ``torch`` leave ldmkit's own defaults on for the variables they do not
set (e.g. ``1thread`` keeps its GOMP_SPINCOUNT). A figure "alone" needs an otherwise idle machine: the load average before each run
is printed, and a note when it was not near 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
OPENMP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
BUSY_LOAD = 0.5  # 1-minute load average above which "alone" was not alone


def free_threads() -> int:
    """Cores this process may use (affinity mask) minus the ones other work keeps busy (1-minute load)."""
    return max(1, cores() - round(os.getloadavg()[0]))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CANDIDATES = {
    "torch": lambda: {"LDMKIT_OPENMP_DEFAULTS": "0"},
    "ldmkit": lambda: {},
    "passive": lambda: {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cores())},
    "spin10k": lambda: {"GOMP_SPINCOUNT": "10000", "OMP_NUM_THREADS": str(cores())},
    "spin100k": lambda: {"GOMP_SPINCOUNT": "100000", "OMP_NUM_THREADS": str(cores())},
    "governor": lambda: {"GOMP_SPINCOUNT": "300000"},
    "1thread": lambda: {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "free": lambda: {"OMP_NUM_THREADS": str(free_threads()), "MKL_NUM_THREADS": str(free_threads())},
}
COMPETITORS = {
    "python": [sys.executable, "-c", "while True: pass"],
    "torch": [
        sys.executable,
        "-c",
        "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True: a @ a",
    ],
}

# The measured step: what the microbenchmark child runs (ldmkit's entry-point defaults first, then torch; the
# training loop's thread governor ticked every step, warm-up of at least WARMUP_SECONDS so that it settles).
MICRO = """
import sys, time, statistics
from ldmkit import threads
from ldmkit.cli import set_openmp_defaults
set_openmp_defaults()
threads.enable()
import torch
iters, warmup = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
    torch.nn.Conv2d(32, 4, 3, padding=1))
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
x, y = torch.randn(8, 4, 32, 32), torch.randn(8, 4, 32, 32)
def step():
    loss = torch.nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
done, start = 0, time.perf_counter()
while done < warmup or time.perf_counter() - start < WARMUP_SECONDS:
    threads.tick()
    step()
    done += 1
times = []
for i in range(iters):
    threads.tick()
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
print(1000 * statistics.median(times), torch.get_num_threads())
"""
WARMUP_SECONDS = 3.0


def child_env(candidate: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS and k != "LDMKIT_OPENMP_DEFAULTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**env, **CANDIDATES[candidate]()}


def micro(candidate: str, iters: int, warmup: int) -> tuple[float, int]:
    r = subprocess.run(
        [sys.executable, "-c", f"WARMUP_SECONDS = {WARMUP_SECONDS}\n" + MICRO, str(iters), str(warmup)],
        env=child_env(candidate),
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"microbenchmark ({candidate}) failed:\n{r.stderr[-2000:]}")
    ms, threads = r.stdout.split()
    return float(ms), int(threads)


def quickstart(candidate: str) -> float:
    with tempfile.TemporaryDirectory(prefix="ldmkit-shared-cpu-") as tmp:
        env = {**child_env(candidate), "LDMKIT_CACHE": str(Path(tmp) / "cache")}
        cmd = [sys.executable, "-m", "ldmkit", "quickstart", "--quick", "--out", str(Path(tmp) / "qs")]
        start = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"quickstart ({candidate}) failed:\n{(r.stdout + r.stderr)[-2000:]}")
        return time.perf_counter() - start


class Competitor:
    """One competing busy process for the duration of a ``with`` block (started, given a second to spin up,
    then terminated by its own pid)."""

    def __init__(self, name: str | None):
        self.name, self.proc = name, None

    def __enter__(self):
        if self.name:
            env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS}
            self.proc = subprocess.Popen(COMPETITORS[self.name], env=env)
            time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def measure(args) -> tuple[dict, float]:
    """{(workload, candidate, competitor or None): [values]} and the highest load average seen before an 'alone' run."""
    results: dict[tuple, list[float]] = {}
    busiest = 0.0
    workloads = ["micro"] + ([] if args.short else ["quickstart"])
    for r in range(args.rounds):
        for workload in workloads:
            for cand in args.candidates:
                for comp in [None, *([] if cand in args.alone else args.competitors)]:
                    if comp is None:
                        busiest = max(busiest, os.getloadavg()[0])
                    with Competitor(comp):
                        if workload == "micro":
                            value, threads = micro(cand, args.iters, args.warmup)
                            results.setdefault(("threads", cand, comp), []).append(threads)
                        else:
                            value = quickstart(cand)
                    results.setdefault((workload, cand, comp), []).append(value)
                    where = f"beside {comp}" if comp else "alone"
                    print(f"round {r + 1}: {workload} {cand} {where}: {value:.2f}", file=sys.stderr, flush=True)
    return results, busiest


def table(args, results: dict, busiest: float) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    for workload, unit in (("micro", "ms/step"), ("quickstart", "s")):
        if (workload, args.candidates[0], None) not in med:
            continue
        head = f"  {'candidate':10} {'threads':>7} {'alone':>9}"
        for comp in args.competitors:
            head += f" {'beside ' + comp:>14} {'ratio':>6}"
        what = "conv-net training step" if workload == "micro" else "ldmkit quickstart --quick"
        print(f"\n{what}, {unit}, median of {args.rounds} round(s)")
        print(head)
        for cand in args.candidates:
            alone = med[(workload, cand, None)]
            threads = med.get(("threads", cand, None), float("nan"))
            line = f"  {cand:10} {threads:7.0f} {alone:9.2f}"
            for comp in args.competitors:
                beside = med.get((workload, cand, comp))
                line += f" {'-':>14} {'-':>6}" if beside is None else f" {beside:14.2f} {beside / alone:5.2f}x"
            print(line)
    envs = ", ".join(f"{c}: {' '.join(f'{k}={v}' for k, v in CANDIDATES[c]().items()) or '-'}" for c in args.candidates)
    print(f"\ncandidates: {envs}")
    if busiest > BUSY_LOAD:
        print(f"note: the machine was busy before 'alone' runs (load average up to {busiest:.2f}): not figures")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="Microbenchmark only, fewer repeats.")
    p.add_argument(
        "--candidates", default=",".join(CANDIDATES), help=f"Comma-separated subset of {','.join(CANDIDATES)}."
    )
    p.add_argument("--competitors", default="python", help=f"Comma-separated subset of {','.join(COMPETITORS)}.")
    p.add_argument(
        "--alone",
        default="",
        help="Candidates measured alone only (e.g. torch: its quickstart beside a busy process takes 15 min).",
    )
    p.add_argument("--rounds", type=int, default=None, help="Rounds (medians printed); default 3, --short 1.")
    p.add_argument("--iters", type=int, default=None, help="Timed microbenchmark steps; default 30, --short 10.")
    p.add_argument("--warmup", type=int, default=3, help="Microbenchmark steps left out first.")
    args = p.parse_args(argv)
    args.candidates = args.candidates.split(",")
    args.competitors = [c for c in args.competitors.split(",") if c]
    args.alone = [c for c in args.alone.split(",") if c]
    for name, known in (("candidate", CANDIDATES), ("competitor", COMPETITORS)):
        bad = [x for x in (args.candidates if name == "candidate" else args.competitors) if x not in known]
        if bad:
            p.error(f"unknown {name} {bad[0]!r}: choose from {', '.join(known)}")
    args.rounds = args.rounds or (1 if args.short else 3)
    args.iters = args.iters or (10 if args.short else 30)
    print(f"shared CPU: {cores()} cores in the affinity mask, load average now {os.getloadavg()[0]:.2f}", flush=True)
    results, busiest = measure(args)
    table(args, results, busiest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
