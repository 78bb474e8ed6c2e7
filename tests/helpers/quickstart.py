"""The quickstart at a test's size: a plan where every stage runs and every evaluation row exists, in seconds,
and the command run in-process (as cli.py runs it)."""

from __future__ import annotations

import argparse


def tiny_plan():
    from ldmkit.quickstart import Plan

    return Plan(
        num_images=32,
        image_size=32,
        vae_steps=4,
        teacher_steps=6,
        distill_steps=3,
        eval_prompts=4,
        teacher_guidance=3.0,
        reference_images=8,
        teacher_steps_full=8,
        lcm_steps=(1, 2, 4),
        teacher_solvers=("ddim", "dpm", "unipc"),
    )


def run_quickstart(argv: list[str]) -> int:
    from ldmkit import quickstart as qs

    parser = argparse.ArgumentParser()
    qs.add_arguments(parser)
    return qs.run(parser.parse_args(argv))
