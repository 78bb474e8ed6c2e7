"""``ldmkit quickstart``: from nothing to a measured few-step model on a CPU.

Stages (each writes its own folder under ``--out``, is skipped when its output exists, and resumes
through the training loop's checkpoints when interrupted):

1. ``data``     synthetic coloured shapes with scoreable captions (or the user's ``--data``)
2. ``text``     a frozen text encoder + word-level tokenizer built offline, and how well it separates captions
3. ``vae``      an AutoencoderKL trained from scratch (``vae`` method)
4. ``teacher``  a U-ViT trained from scratch on cached latents (``uvit`` method)
5. ``distill``  ``--method``: LCM-LoRA (default), full LCD (``lcd``, alias ``--lcd``), TCD or PCM (LoRA or full)
6. ``evaluate`` the teacher with DDIM (also at 50 steps: the reference set), DPM-Solver++ 2M and UniPC against
                the distilled model at 1, 2, 4 (and 8) steps: prompt adherence, distance to the data and to
                the teacher's 50-step images from the same noise, speed
7. ``report``   ``report.html`` (grids, plots, table) and ``report.json`` (figures + every stage's export)

How many steps each stage trains is planned from the data and the time allowed (``plan_for``, ``--minutes``).
``--objective flow`` trains the teacher with the rectified-flow objective instead (configs/uvit/quickstart_flow.yaml),
distils it with the methods that take a flow teacher and compares it with flow Euler, Heun, DPM-Solver++ 2M and
UniPC (``for_objective``); one objective per ``--out``.

The package: ``plan`` (the planner and its measured constants), ``stages`` (each stage and their order,
``quickstart``), ``students`` (what the quickstart knows about each ``--method``), ``cache`` (the evaluation
cache), ``cli`` (the command's options and what it prints).
"""

from ldmkit.quickstart.cli import add_arguments, run
from ldmkit.quickstart.plan import (
    BATCH,
    FULL,
    LABELLED_TEACHER_FACTOR,
    MAX_PASSES,
    MIN_STEPS,
    QUICK,
    Plan,
    full_plan_minutes,
    plan_for,
)
from ldmkit.quickstart.stages import (
    HELDOUT_IMAGES,
    TEXT_LAYERS,
    TEXT_MAX_LENGTH,
    data_size,
    is_shapes_data,
    quickstart,
    stage_adherence,
    stage_data,
    stage_distill,
    stage_evaluate,
    stage_teacher,
    stage_text,
    stage_vae,
    text_encoder_plan,
)
from ldmkit.quickstart.students import student_methods

__all__ = [
    "BATCH",
    "FULL",
    "HELDOUT_IMAGES",
    "LABELLED_TEACHER_FACTOR",
    "MAX_PASSES",
    "student_methods",
    "MIN_STEPS",
    "QUICK",
    "TEXT_LAYERS",
    "TEXT_MAX_LENGTH",
    "Plan",
    "add_arguments",
    "data_size",
    "full_plan_minutes",
    "is_shapes_data",
    "plan_for",
    "quickstart",
    "run",
    "stage_adherence",
    "stage_data",
    "stage_distill",
    "stage_evaluate",
    "stage_teacher",
    "stage_text",
    "stage_vae",
    "text_encoder_plan",
]
