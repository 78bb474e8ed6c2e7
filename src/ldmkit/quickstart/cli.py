"""``ldmkit quickstart``'s command line: its options (``add_arguments``) and what it prints (``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldmkit.quickstart.plan import full_plan_minutes
from ldmkit.quickstart.stages import quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="quickstart", help="Folder of every stage's output and the report.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="About a minute on a 2-core CPU (fewer images and steps; 66 s measured): CI and a first look.",
    )
    parser.add_argument(
        "--method",
        default=None,
        help="Distillation method (default: lcm_lora): any method that distils the quickstart's teacher (LCM, TCD, "
        "PCM as a LoRA or a full student; DMD2-LoRA); an unknown name lists them. Several methods can share one "
        "--out: data, VAE, teacher and the teacher's evaluation are reused.",
    )
    parser.add_argument("--lcd", action="store_true", help="Alias of --method lcd (a full LCD student).")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="Time budget: the VAE, teacher and distillation steps are planned from your data within it (the report "
        "says how and why). Default: what the full plan takes on a 2-core CPU (about "
        f"{full_plan_minutes():.0f} min).",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="Your own image-caption data (any ldmkit data source) instead of the synthetic shapes.",
    )
    parser.add_argument(
        "--kind",
        choices=("shapes", "glyphs"),
        default="shapes",
        help="Generated data when no --data: shapes (four scoreable attributes) or glyphs (captions that differ "
        "in one word, as class-labelled data).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of data synthesis, training and evaluation.")
    parser.add_argument(
        "--objective",
        choices=("eps", "flow"),
        default="eps",
        help="The teacher's training objective: eps (DDPM epsilon prediction) or flow (rectified flow with SD3's "
        "time shift; compared with flow Euler / Heun / DPM-Solver++ / UniPC, distilled by the methods that take a "
        "flow teacher). One objective per --out.",
    )


def run(args: argparse.Namespace) -> int:
    from ldmkit import inputs, outputs
    from ldmkit.eval.report import display_name, table_rows

    inputs.check_finite("--minutes", args.minutes, positive=True)  # before the data stage, not after it
    outputs.claim(args.out, "quickstart", flag=None, own=("report.json", "vae", "teacher"))  # stages: a resume
    report = quickstart(
        args.out,
        quick=args.quick,
        lcd=args.lcd,
        data=args.data,
        seed=args.seed,
        kind=args.kind,
        method=args.method,
        minutes=args.minutes,
        objective=args.objective,
    )
    print(f"plan: {report['plan_reason']}")
    figs = report["figures"]
    print(
        f"{'setting':<18} {'steps':>5} {'adherence':>9} {'FD data':>8} {'FD t50':>8} {'ms/image':>9} {'evals/img':>9}"
    )
    for key, label in table_rows(report):
        f = figs[key]

        def cell(v: float | None, width: int, fmt: str) -> str:
            return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"

        print(
            f"{label:<18} {f['steps']:>5} {cell(f['adherence'], 9, '.3f')} {cell(f['fd'], 8, '.3f')} "
            f"{cell(f.get('fd_to_teacher_50'), 8, '.3f')} {f['seconds_per_image'] * 1000:>9.1f} "
            f"{f['unet_evals_per_image']:>9.0f}"
        )
    for name, entry in report["caption_adherence"]["models"].items():
        acc = f", label accuracy {entry['label_accuracy']:.2f}" if "label_accuracy" in entry else ""
        shown = display_name(name, report)
        print(f"{shown}: caption sensitivity {entry['sensitivity']:.2f}{acc}")
        if entry["warning"]:
            print(f"WARNING {shown}: {entry['warning']}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
