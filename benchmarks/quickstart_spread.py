"""How far the quickstart's figures move with the seed and the thread count: mean and spread.

Seeded runs are bit-identical on one machine and thread count, but float reduction order changes with the
number of threads (and the CPU model), training follows it, and a distillation recipe may turn that into a
large change in quality. This runs the full quickstart for every seed x thread count (each in its own
--out folder under ``--root``; finished stages are skipped, so re-running only adds what is missing and
prints the table again) and prints, per setting, mean, min and max over the runs, and the checks:

- LCM-4 adherence >= 0.9x the teacher's guided 50-step adherence on average, and >= 0.85x in the worst run;
- LCM-4 FD to the data below the teacher's DDIM-4 FD in every run.

    python benchmarks/quickstart_spread.py --seeds 0 1 2 --threads 1 2 [--train-seeds 1] [--jobs 2] [--method tcd_lora]

Every seed runs the whole quickstart with one thread (``t1-s<seed>``: data, VAE, teacher, distillation,
evaluation). Every other thread count N distils the SAME teacher again and evaluates at N threads
(``t<N>-s<seed>``): the perturbation isolates the distillation recipe's sensitivity to float reduction
order, which is what moved the LCM-LoRA's figures between machines while the teacher's stayed close.
Every ``--train-seeds`` K distils the same teacher again with ``train.seed=K`` (``d<K>-s<seed>``: another
data order, noise and LoRA initialisation): the recipe's sensitivity to its own randomness. The summary
takes the ``t1`` runs as the distribution over seeds and lists the others next to their seed's ``t1`` run.
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


def run_dir(root: Path, seed: int, threads: int, train_seed: int | None = None) -> Path:
    return root / (f"t{threads}-s{seed}" if train_seed is None else f"d{train_seed}-s{seed}")


def launch(root: Path, seed: int, threads: int, method: str, train_seed: int | None) -> subprocess.Popen:
    out = run_dir(root, seed, threads, train_seed)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if threads == 1 and train_seed is None:
        cmd = [sys.executable, "-m", "ldmkit", "quickstart", "--seed", str(seed), "--out", str(out)]
        cmd += ["--method", method]
    else:
        cmd = [sys.executable, __file__, "--redistil", str(run_dir(root, seed, 1)), str(out), str(seed), method]
        cmd += [] if train_seed is None else ["--train-seed", str(train_seed)]
    log = open(out.with_suffix(".log"), "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def redistil(source: Path, out: Path, seed: int, method: str, train_seed: int | None = None) -> None:
    """Distil the teacher of the quickstart run ``source`` again into ``out`` (at this process's thread
    count; with ``train_seed``: another seed of the distillation's data order, noise and LoRA init), evaluate
    as the quickstart does, and write ``out/report.json`` with the figures."""
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
    overrides = () if train_seed is None else (f"--train.seed={train_seed}",)
    student = q.stage_distill(out, data, plan, teacher, method, overrides)
    results = q.stage_evaluate(out, plan, teacher, student, method, data, True, seed)
    adherence = q.stage_adherence(out, plan, teacher, student, method, data, seed)
    report = {
        "method": method,
        "teacher_from": str(source),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
        "train_seed": train_seed,
        "plan": asdict(plan),
        "figures": summarise(results, asdict(plan), method=method),
        "caption_adherence": adherence,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))


def run_all(root: Path, seeds: list[int], threads: list[int], train_seeds: list[int], jobs: int, method: str) -> None:
    # One thread first: the other runs redistil those teachers. Items: (seed, threads, train seed or None).
    items = [(s, n, None) for n in sorted(threads) for s in seeds] + [(s, 1, k) for k in train_seeds for s in seeds]
    todo = [it for it in items if not (run_dir(root, *it) / "report.json").is_file()]
    running: list[tuple[subprocess.Popen, tuple[int, int, int | None]]] = []
    while todo or running:
        busy = sum(it[1] for _, it in running)
        for item in list(todo):
            seed, n, k = item
            ready = (n == 1 and k is None) or (run_dir(root, seed, 1) / "report.json").is_file()
            alone_ok = not running
            paired_ok = n == 1 and busy + 1 <= jobs and all(it[1] == 1 for _, it in running)
            if ready and (alone_ok or paired_ok):
                print(f"start {run_dir(root, *item).name}", flush=True)
                running.append((launch(root, seed, n, method, k), item))
                todo.remove(item)
                busy += n
        time.sleep(5)
        for proc, item in list(running):
            if proc.poll() is not None:
                running.remove((proc, item))
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see its log"
                print(f"{run_dir(root, *item).name}: {status}", flush=True)


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


def summary(root: Path, seeds: list[int], threads: list[int], train_seeds: list[int]) -> dict:
    runs = {}
    for item in [(s, n, None) for n in threads for s in seeds] + [(s, 1, k) for k in train_seeds for s in seeds]:
        f = run_dir(root, *item) / "report.json"
        if f.is_file():
            runs[run_dir(root, *item).name] = figures(json.loads(f.read_text()))
    # The distribution over seeds: the full runs (the others redistil those teachers: listed per run below).
    over_seeds = {name: r for name, r in runs.items() if name.startswith("t1-")}
    keys = list(dict.fromkeys(k for r in over_seeds.values() for k in r))
    table = {}
    for k in keys:
        values = [r[k] for r in over_seeds.values() if k in r]
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
    parser.add_argument(
        "--train-seeds", type=int, nargs="*", default=[], help="Distil each teacher again with these train.seed."
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="1-thread runs at once.")
    parser.add_argument("--method", default="lcm_lora", help="The quickstart's --method.")
    parser.add_argument("--summary-only", action="store_true", help="Print the table of finished runs only.")
    parser.add_argument("--redistil", nargs=4, metavar=("SOURCE", "OUT", "SEED", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--train-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.redistil:
        source, out, seed, method = args.redistil
        redistil(Path(source), Path(out), int(seed), method, args.train_seed)
        return
    root = Path(args.root)
    if not args.summary_only:
        run_all(root, args.seeds, args.threads, args.train_seeds, args.jobs, args.method)
    result = summary(root, args.seeds, args.threads, args.train_seeds)
    (root / "spread.json").write_text(json.dumps(result, indent=1))
    print(f"{len(result['runs'])} runs: {', '.join(result['runs'])}; the table: the full runs (t1-*) over seeds")
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
    key_a = student4 or ""
    key_f = key_a.replace(" adherence", " FD to data")
    for name, r in result["runs"].items():
        if not name.startswith("t1-") and key_a in r:
            base = result["runs"].get("t1-" + name.split("-", 1)[1], {})
            print(
                f"{name}: 4-step adherence {r[key_a]:.3f} (t1 run {base.get(key_a, float('nan')):.3f}), "
                f"FD {r[key_f]:.4f} ({base.get(key_f, float('nan')):.4f})"
            )


if __name__ == "__main__":
    main()
