"""How far the quickstart's figures move with the seed and the thread count: mean and spread.

Seeded runs are bit-identical on one machine and thread count, but float reduction order changes with the
number of threads (and the CPU model), training follows it, and a distillation recipe may turn that into a
large change in quality. This runs the full quickstart for every seed x thread count (each in its own
--out folder under ``--root``; finished stages are skipped, so re-running only adds what is missing and
prints the table again) and prints, per setting, mean, min and max over the runs, and the checks:

- LCM-4 adherence >= 0.9x the teacher's guided 50-step adherence on average, and >= 0.85x in the worst run;
- LCM-4 FD to the data below the teacher's DDIM-4 FD in every run.

    python benchmarks/quickstart_spread.py --seeds 0 1 2 --threads 1 2 [--jobs 2] [--method tcd_lora]

Every seed runs the whole quickstart with one thread (``t1-s<seed>``: data, VAE, teacher, distillation,
evaluation). Every other thread count N distils the SAME teacher again and evaluates at N threads
(``t<N>-s<seed>``): the perturbation isolates the distillation recipe's sensitivity to float reduction
order, which is what moved the LCM-LoRA's figures between machines while the teacher's stayed close.
Runs with one thread go ``--jobs`` at a time (one per core); runs with more threads go alone, so they do
not oversubscribe the cores (on 2 cores two 2-thread runs at once can be many times slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_dir(root: Path, seed: int, threads: int) -> Path:
    return root / f"t{threads}-s{seed}"


def launch(root: Path, seed: int, threads: int, method: str) -> subprocess.Popen:
    out = run_dir(root, seed, threads)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads == 1:
        cmd = [sys.executable, "-m", "ldmkit", "quickstart", "--seed", str(seed), "--out", str(out)]
        cmd += ["--method", method]
    else:
        cmd = [sys.executable, __file__, "--redistil", str(run_dir(root, seed, 1)), str(out), str(seed), method]
    log = open(out.with_suffix(".log"), "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def redistil(source: Path, out: Path, seed: int, method: str) -> None:
    """Distil the teacher of the quickstart run ``source`` again into ``out`` (at this process's thread
    count), evaluate as the quickstart does, and write ``out/report.json`` with the figures."""
    from dataclasses import asdict

    from ldmkit import quickstart as q
    from ldmkit.eval.report import summarise

    plan = q.Plan(
        **{
            k: tuple(v) if k == "lcm_steps" else v
            for k, v in json.loads((source / "report.json").read_text())["plan"].items()
        }
    )
    data, teacher = source / "data", source / "teacher" / "export"
    student = q.stage_distill(out, data, plan, teacher, method)
    results = q.stage_evaluate(out, plan, teacher, student, method, data, True, seed)
    adherence = q.stage_adherence(out, plan, teacher, student, method, data, seed)
    report = {
        "method": method,
        "teacher_from": str(source),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
        "plan": asdict(plan),
        "figures": summarise(results, asdict(plan), method=method),
        "caption_adherence": adherence,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))


def run_all(root: Path, seeds: list[int], threads: list[int], jobs: int, method: str) -> None:
    threads = sorted(threads)  # one thread first: the other counts redistil its teachers
    todo = [(s, n) for n in threads for s in seeds if not (run_dir(root, s, n) / "report.json").is_file()]
    running: list[tuple[subprocess.Popen, int, int]] = []
    while todo or running:
        busy = sum(n for _, _, n in running)
        for item in list(todo):
            seed, n = item
            ready = n == 1 or (run_dir(root, seed, 1) / "report.json").is_file()
            alone_ok = not running
            paired_ok = n == 1 and busy + 1 <= jobs and all(m == 1 for _, _, m in running)
            if ready and (alone_ok or paired_ok):
                print(f"start seed {seed}, {n} thread(s)", flush=True)
                running.append((launch(root, seed, n, method), seed, n))
                todo.remove(item)
                busy += n
        time.sleep(5)
        for proc, seed, n in list(running):
            if proc.poll() is not None:
                running.remove((proc, seed, n))
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see its log"
                print(f"seed {seed}, {n} thread(s): {status}", flush=True)


def figures(report: dict) -> dict[str, float]:
    figs = report["figures"]
    out: dict[str, float] = {}
    for name, f in figs.items():
        if not isinstance(f, dict):
            continue
        if f.get("adherence") is not None:
            out[f"{name} adherence"] = f["adherence"]
        if f.get("fd") is not None:
            out[f"{name} FD to data"] = f["fd"]
    student4 = next((k for k in figs if k.endswith("_4") and not k.startswith("teacher")), None)
    if student4 and figs[student4].get("adherence") is not None and figs["teacher_50"]["adherence"]:
        out["student 4 / teacher 50 adherence"] = figs[student4]["adherence"] / figs["teacher_50"]["adherence"]
    if student4 and figs[student4].get("fd") is not None:
        out["student 4 FD - teacher DDIM 4 FD"] = figs[student4]["fd"] - figs["teacher_4"]["fd"]
    return out


def summary(root: Path, seeds: list[int], threads: list[int]) -> dict:
    runs = {}
    for n in threads:
        for s in seeds:
            f = run_dir(root, s, n) / "report.json"
            if f.is_file():
                runs[f"t{n}-s{s}"] = figures(json.loads(f.read_text()))
    keys = list(dict.fromkeys(k for r in runs.values() for k in r))
    table = {}
    for k in keys:
        values = [r[k] for r in runs.values() if k in r]
        table[k] = {
            "mean": statistics.fmean(values),
            "min": min(values),
            "max": max(values),
            "std": statistics.pstdev(values),
            "runs": len(values),
        }
    return {"runs": runs, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="quickstart-spread", help="Folder of the runs (one --out each).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="1-thread runs at once.")
    parser.add_argument("--method", default="lcm_lora", help="The quickstart's --method.")
    parser.add_argument("--summary-only", action="store_true", help="Print the table of finished runs only.")
    parser.add_argument("--redistil", nargs=4, metavar=("SOURCE", "OUT", "SEED", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.redistil:
        source, out, seed, method = args.redistil
        redistil(Path(source), Path(out), int(seed), method)
        return
    root = Path(args.root)
    if not args.summary_only:
        run_all(root, args.seeds, args.threads, args.jobs, args.method)
    result = summary(root, args.seeds, args.threads)
    (root / "spread.json").write_text(json.dumps(result, indent=1))
    print(f"{len(result['runs'])} runs: {', '.join(result['runs'])}")
    print(f"{'figure':<40} {'mean':>8} {'min':>8} {'max':>8} {'std':>8}")
    for k, v in result["table"].items():
        print(f"{k:<40} {v['mean']:>8.3f} {v['min']:>8.3f} {v['max']:>8.3f} {v['std']:>8.3f}")
    t = result["table"]
    ratio, gap = t.get("student 4 / teacher 50 adherence"), t.get("student 4 FD - teacher DDIM 4 FD")
    student4 = next((k for k in t if k.endswith("_4 adherence") and not k.startswith("teacher")), None)
    if ratio and student4:
        of_means = t[student4]["mean"] / t["teacher_50 adherence"]["mean"]
        print(f"check: mean 4-step adherence / mean teacher-50 adherence {of_means:.3f} (>= 0.9)")
        print(f"check: worst run's 4-step / teacher-50 adherence {ratio['min']:.3f} (>= 0.85)")
    if gap:
        print(
            f"check: 4-step FD below teacher DDIM-4 FD in every run: {gap['max'] < 0} (largest gap {gap['max']:+.3f})"
        )


if __name__ == "__main__":
    main()
