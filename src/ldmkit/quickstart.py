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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from ldmkit.diffusion.samplers import TEACHER_SOLVERS
from ldmkit.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Sizes of one quickstart run (the full one and ``--quick``)."""

    num_images: int
    image_size: int
    vae_steps: int
    teacher_steps: int
    distill_steps: int
    eval_prompts: int
    teacher_guidance: float
    reference_images: int = 1000
    teacher_steps_full: int = 50
    lcm_steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_solvers: tuple[str, ...] = TEACHER_SOLVERS
    """Training-free solvers the teacher is evaluated with at ``lcm_steps`` (DDIM always: at
    ``teacher_steps_full`` it gives the reference set every distance is measured to)."""


FULL = Plan(
    num_images=4000,
    image_size=32,
    vae_steps=600,
    teacher_steps=2000,
    distill_steps=1500,
    eval_prompts=120,
    teacher_guidance=3.0,
)
# --quick checks that every stage runs and writes its report (CI, a first look): 66 s measured alone on a
# 2-core CPU (default threads);
# its teacher is far too short to learn the shapes, so its quality figures are near zero by design.
QUICK = Plan(
    num_images=500,
    image_size=32,
    vae_steps=120,
    teacher_steps=300,
    distill_steps=60,
    eval_prompts=16,
    teacher_guidance=3.0,
    reference_images=200,
    lcm_steps=(1, 2, 4),
    teacher_solvers=("ddim",),  # DPM-Solver++ / UniPC rows would only lengthen a smoke run
)


@dataclass(frozen=True)
class Student:
    """How the quickstart trains, loads and samples one distillation method's export."""

    label: str
    """Its name in the report and the terminal."""
    lora: bool
    """A LoRA of the teacher (w baked in, sampled without CFG) or a whole pipeline (w through its embedding)."""
    sampler: str
    """The ``ldmkit.inference.SCHEDULERS`` name its export samples with."""


STUDENTS: dict[str, Student] = {
    "lcm_lora": Student("LCM-LoRA", lora=True, sampler="lcm"),
    "lcd": Student("LCM", lora=False, sampler="lcm"),
    "tcd_lora": Student("TCD-LoRA", lora=True, sampler="tcd"),
    "tcd": Student("TCD", lora=False, sampler="tcd"),
    "pcm_lora": Student("PCM-LoRA", lora=True, sampler="tcd"),
    "pcm": Student("PCM", lora=False, sampler="tcd"),
}
"""``--method`` -> how its student is handled; every one has a ``configs/<method>/quickstart.yaml``."""
METHODS = tuple(STUDENTS)


# ----------------------------------------------------------------------------------------------------
# The plan: how many steps each stage trains, from the data and the minutes allowed

REFERENCE_IMAGES = FULL.num_images
REFERENCE_CAPTIONS = 120
"""The data FULL was tuned on: 4000 generated shapes images, which hold all 120 shapes captions (4 colours x
3 shapes x 2 sizes x 5 positions; ldmkit.data.synth)."""

STAGES = ("vae", "teacher", "distill")
BATCH = {"vae": 16, "teacher": 32, "distill": 32}
"""train.batch_size of configs/vae, uvit and <method>/quickstart.yaml: a pass over N images is N / batch steps."""

# Seconds per training step on the machine the README's figures come from (2-core CPU shared with other jobs,
# OMP_NUM_THREADS=1, batch as above), from the stage times of one full run: VAE 600 steps 133 s, teacher 2000
# steps 276 s (encoding the 4000 images into the latent cache included), LCM-LoRA 1500 steps 462 s.
# Measured later on the same machine under a heavier load (~4 on 2 cores: an LCM-LoRA step took 0.70 s, not
# 0.31 s), so as ratios to an LCM-LoRA step:
# - encoding one image into the latent cache: a 2-step teacher run on 4000 shapes with a fresh cache minus one
#   with the cache built, twice: 3.0 and 3.2 ms/image, i.e. ~1.4 ms at the full run's speed;
# - a full-student step (lcd, tcd, pcm: an fp32 student with backward, its EMA target, the frozen teacher; no
#   LoRA layers) per LCM-LoRA step (tcd_lora the same), train_stats.json's seconds per step on the quickstart
#   U-ViT, runs alternated: 0.88 (lcd vs lcm_lora, 60 steps, three rounds) and 1.00 (lcd, pcm vs lcm_lora,
#   tcd_lora, 40 steps, two rounds): 0.94. TCD and PCM cost what LCM does (only the target point differs).
ENCODE_SECONDS = 0.0014
VAE_STEP_SECONDS = 133 / 600
TEACHER_STEP_SECONDS = (276 - ENCODE_SECONDS * 4000) / 2000
LORA_STEP_SECONDS = 462 / 1500
FULL_STUDENT_RATIO = 0.94
# Evaluation: 22 s measured for the full plan's teacher DDIM 4 + 50 steps and the student at 1, 2, 4, 8 steps
# (120 prompts); the teacher solvers added since (DDIM 1, 2, 8, DPM-Solver++ and UniPC at 1, 2, 4, 8: 11 settings,
# 41 guided steps) estimated from the README's ms/image (a guided teacher step ~2.0 ms/image, a setting's fixed
# cost ~4 ms/image): 120 x (41 x 2.0 + 11 x 4) ms = 15 s. They run once per teacher (cached in evaluate/teacher/).
# Everything else (data synthesis, text encoder, caption adherence, report): 13 s of the run's 906 s.
EVAL_SECONDS = 22 + 15
OTHER_SECONDS = 13

MIN_STEPS = {"vae": 200, "teacher": 600, "distill": 300}
"""Below these a stage is not worth running; a smaller budget runs these and says so. A judgement, not measured
at these counts: a third of the VAE's 600 steps (which reconstruct held-out shapes at 0.92), twice the 300 steps
of --quick's teacher (which learns no shapes at all), and under the 400 steps at which LCM-LoRA of a 64-wide
teacher already reached 0.72 adherence (configs/lcm_lora/quickstart.yaml)."""
LABELLED_TEACHER_FACTOR = 2.0
"""Class-labelled data (captions that differ in one word, ``labels_of``) gets twice the teacher's steps: the
label is one token of the caption and is learned late. Measured on 4000 glyph images (10 labels), the
quickstart teacher with its labelled-data text encoder (``text_encoder_plan``), label accuracy of guided DDIM 50
steps (120 samples): 2000 steps 0.78 and 0.54 (seeds 0, 1), 4000 steps 1.00 and 0.98."""
MAX_PASSES = {"vae": 20, "teacher": 60, "distill": 40}
"""More passes over small data than these would only memorise it (a judgement; the full plan makes 2.4, 16 and
12 passes over its 4000 images)."""


def _step_seconds(method: str) -> dict[str, float]:
    distill = LORA_STEP_SECONDS * (1.0 if STUDENTS[method].lora else FULL_STUDENT_RATIO)
    return {"vae": VAE_STEP_SECONDS, "teacher": TEACHER_STEP_SECONDS, "distill": distill}


def _seconds(steps: dict[str, float], method: str, num_images: int, left: dict[str, float] | None = None) -> float:
    """Estimated run time: ``left`` steps of each stage (default all of ``steps``), the latent cache when the
    teacher still has to train, evaluation and the rest."""
    left = steps if left is None else left
    per_step = _step_seconds(method)
    encode = ENCODE_SECONDS * num_images if left["teacher"] > 0 else 0.0
    return OTHER_SECONDS + EVAL_SECONDS + encode + sum(left[s] * per_step[s] for s in STAGES)


def full_plan_minutes(method: str = "lcm_lora", labelled: bool = False) -> float:
    """What the full plan takes on the reference machine: the default budget of ``--minutes`` (``labelled``: the
    full plan for class-labelled data, whose teacher trains LABELLED_TEACHER_FACTOR times longer)."""
    teacher = FULL.teacher_steps * (LABELLED_TEACHER_FACTOR if labelled else 1.0)
    steps = {"vae": FULL.vae_steps, "teacher": teacher, "distill": FULL.distill_steps}
    return _seconds(steps, method, REFERENCE_IMAGES) / 60


def _round_steps(x: float) -> int:
    return max(10, int(round(x / 10)) * 10)


def plan_for(
    num_images: int,
    num_distinct_captions: int,
    minutes: float | None = None,
    quick: bool = False,
    *,
    method: str = "lcm_lora",
    done: dict[str, tuple[int, int]] | None = None,
    labelled: bool = False,
) -> tuple[Plan, str]:
    """The plan for ``num_images`` training images with ``num_distinct_captions`` distinct captions within
    ``minutes`` (None: what the full plan takes, ``full_plan_minutes``), and one paragraph saying why.

    ``labelled``: the captions are class labels (``labels_of``): the teacher's steps and the default budget grow
    by LABELLED_TEACHER_FACTOR's measurement.

    ``done``: stages already started in this --out (stage -> (steps it was started with, steps still to train));
    they keep their steps (a finished teacher is reused by every --method), and only what is left costs time.

    The rules: FULL's steps were tuned on 4000 images with 120 captions (the shapes). A stage's useful steps
    grow with the square root of the data (more images: more variety to fit, with diminishing returns); the
    teacher's also with the square root of the distinct captions beyond 120 (more conditions to learn; fewer
    captions do not mean simpler images, e.g. glyphs: 10 captions, many styles), the distillation's with its
    fourth root. Small data caps the steps at MAX_PASSES passes over it; MIN_STEPS is the floor. When the
    useful steps take longer than the budget, every stage still to train is scaled by one factor to fit it
    (not below its floor); more minutes than the data needs do not grow the plan past what was measured (on the
    shapes, full LCD gained nothing from 1500 to 3000 steps: configs/lcd/quickstart.yaml).
    The default (no minutes, 4000 images, 120 captions) is exactly FULL.
    """
    if quick:
        return replace(QUICK, num_images=num_images), (
            f"--quick: fixed small sizes (VAE {QUICK.vae_steps}, teacher {QUICK.teacher_steps}, distillation "
            f"{QUICK.distill_steps} steps, {QUICK.eval_prompts} evaluation prompts; {QUICK.num_images} images when "
            "generated) to check that every stage runs; neither the data nor --minutes changes them."
        )
    if num_images < 1:
        raise UserError("the training data has no readable images")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--minutes must be a positive number, got {minutes}")
    done = done or {}
    label = STUDENTS[method].label
    n = num_images
    captions = min(max(num_distinct_captions, 1), n)
    image_factor = math.sqrt(n / REFERENCE_IMAGES)
    caption_factor = math.sqrt(max(1.0, captions / REFERENCE_CAPTIONS))
    full = {"vae": FULL.vae_steps, "teacher": FULL.teacher_steps, "distill": FULL.distill_steps}
    label_factor = LABELLED_TEACHER_FACTOR if labelled else 1.0
    growth = {"vae": image_factor, "teacher": image_factor * caption_factor * label_factor}
    growth["distill"] = image_factor * math.sqrt(caption_factor)
    capped: list[str] = []  # stages held to MAX_PASSES over small data
    memorise: list[str] = []  # stages whose floor alone passes over the data more often than that

    useful: dict[str, float] = {}
    for stage in STAGES:
        want = full[stage] * growth[stage]
        cap = MAX_PASSES[stage] * n / BATCH[stage]
        if want > cap:
            want = 10 * math.floor(cap / 10)  # the plan's steps are whole tens: stay under the cap
            capped.append(stage)
        if want < MIN_STEPS[stage]:
            if cap < MIN_STEPS[stage]:
                memorise.append(stage)
            want = MIN_STEPS[stage]
        useful[stage] = want
    for stage, (steps, _) in done.items():
        useful[stage] = steps
    left = {s: float(done[s][1]) if s in done else useful[s] for s in STAGES}

    default_budget = minutes is None
    budget = 60 * (full_plan_minutes(method, labelled) if default_budget else minutes)
    needed = _seconds(useful, method, n, left)
    steps = dict(useful)
    todo = [s for s in STAGES if s not in done]
    too_small = False
    scale = 1.0
    if needed > budget * (1 + 1e-9) and todo:
        per_step = _step_seconds(method)
        # what the budget cannot shrink: evaluation, the rest, the latent cache, stages already under way
        fixed = needed - sum(useful[s] * per_step[s] for s in todo)
        floored: set[str] = set()
        while True:
            free = [s for s in todo if s not in floored]
            room = budget - fixed - sum(MIN_STEPS[s] * per_step[s] for s in floored)
            scale = room / sum(useful[s] * per_step[s] for s in free) if free else 0.0
            low = [s for s in free if useful[s] * scale < MIN_STEPS[s]]
            if not low:
                break
            floored.update(low)
        for s in todo:
            steps[s] = MIN_STEPS[s] if s in floored else useful[s] * scale
        too_small = not [s for s in todo if s not in floored]
    plan_steps = {s: (int(steps[s]) if s in done else _round_steps(steps[s])) for s in STAGES}
    plan = replace(
        FULL,
        num_images=n,
        vae_steps=plan_steps["vae"],
        teacher_steps=plan_steps["teacher"],
        distill_steps=plan_steps["distill"],
    )

    passes = {s: plan_steps[s] * BATCH[s] / n for s in STAGES}
    left_final = {s: float(done[s][1]) if s in done else float(plan_steps[s]) for s in STAGES}
    estimate = _seconds({k: float(v) for k, v in plan_steps.items()}, method, n, left_final) / 60
    text = [
        f"Plan for {n} training images with {captions} distinct caption{'s' if captions != 1 else ''} and "
        f"{label} distillation: VAE {plan_steps['vae']} steps ({passes['vae']:.1f} passes over the data), teacher "
        f"{plan_steps['teacher']} ({passes['teacher']:.1f} passes), distillation {plan_steps['distill']} "
        f"({passes['distill']:.1f} passes); about {estimate:.1f} min on a 2-core CPU at 1 thread, where the "
        "per-step times were measured (other machines differ)."
    ]
    if default_budget:
        kind = " for class-labelled data" if labelled else ""
        text.append(f"No --minutes: the budget is what the full plan{kind} takes there, {budget / 60:.1f} min.")
    if labelled:
        text.append(
            f"The captions are class labels (they differ in one word): the teacher trains {label_factor:g} times "
            "longer, since a label carried by one token is learned late."
        )
    if n == REFERENCE_IMAGES and captions <= REFERENCE_CAPTIONS:
        why = "4000 images: the data size the full plan was tuned on (4000 shapes images, 120 captions)"
        if captions < REFERENCE_CAPTIONS:
            why += "; fewer distinct captions do not lower the steps (they need not mean simpler images)"
        text.append(why + ".")
    else:
        why = f"The full plan's steps were tuned on 4000 images with 120 captions; {n} images scale them by {image_factor:.2f}"
        if caption_factor > 1:
            why += f", and {captions} captions the teacher's by a further {caption_factor:.2f}"
        text.append(why + " (square roots: more data needs more steps, with diminishing returns).")
    capped = [s for s in capped if s not in memorise]
    if capped:
        text.append(
            f"Small data: at most {_listed(capped, MAX_PASSES)} passes over the {n} images for the "
            f"{_listed(capped)} (more would only memorise them)."
        )
    if memorise:
        passes_at_floor = {s: round(MIN_STEPS[s] * BATCH[s] / n) for s in memorise}
        text.append(
            f"Even the minimum useful steps make {_listed(memorise, passes_at_floor)} passes for the "
            f"{_listed(memorise)}: expect them to memorise the images (more images help more than more steps)."
        )
    for stage, (steps_done, steps_left) in done.items():
        state = "trained" if steps_left == 0 else f"started ({steps_left} steps to go)"
        text.append(
            f"The {_STAGE_NAMES[stage]} was already {state} in this folder with {steps_done} steps: kept (another "
            "--out, or removing that stage's folder, plans it anew)."
        )
    if too_small:
        floor_minutes = (
            _seconds(
                {s: float(MIN_STEPS[s]) if s in todo else float(plan_steps[s]) for s in STAGES},
                method,
                n,
                {s: float(MIN_STEPS[s]) if s in todo else left[s] for s in STAGES},
            )
            / 60
        )
        text.append(
            f"The budget of {budget / 60:.1f} min is too small: the minimum useful steps (VAE {MIN_STEPS['vae']}, "
            f"teacher {MIN_STEPS['teacher']}, distillation {MIN_STEPS['distill']}) take about {floor_minutes:.1f} min; "
            "running those."
        )
    elif scale < 1.0:
        text.append(
            f"All of that would take about {needed / 60:.1f} min; to fit {budget / 60:.1f} min the stages still to "
            f"train get {scale:.0%} of their steps"
            + (" (a stage at its minimum keeps it)" if any(steps[s] == MIN_STEPS[s] for s in todo) else "")
            + "."
        )
    elif estimate < budget / 60 * 0.9:
        text.append(
            f"That is less than the {budget / 60:.1f} min allowed: the plan does not grow past the steps measured "
            "on the shapes (full LCD gained nothing from 1500 to 3000 distillation steps; what the 2000-step teacher "
            "reaches over seeds is in the README)."
        )
    return plan, " ".join(text)


_STAGE_NAMES = {"vae": "VAE", "teacher": "teacher", "distill": "distillation"}


def _listed(stages: list[str], values: dict[str, Any] | None = None) -> str:
    """ "VAE, teacher and distillation", or their values "20, 60 and 40"."""
    words = [str(values[s]) if values is not None else _STAGE_NAMES[s] for s in stages]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ----------------------------------------------------------------------------------------------------
# Stage helpers


def _train(method_recipe: str, overrides: list[str]) -> Path:
    """Run (or resume, or skip when finished) one training stage through the shared loop. Stages draw no
    validation grids (the report's evaluation replaces them); their TensorBoard logs are in <stage>/logs."""
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    cfg = load_config(method_recipe, [*overrides, "--train.validate_every=0"])
    return train(cfg)


def _stage_progress(run: Path) -> tuple[int, int] | None:
    """(train.max_steps it was started with, steps still to train) of a stage's run folder, or None when the
    stage has not started: a re-run (another --method, other --minutes) keeps what a stage was started with
    (the loop refuses a lower max_steps, and a finished teacher is shared by every method)."""
    import yaml

    saved = run / "config.yaml"
    if not saved.is_file():
        return None
    try:
        steps = int(yaml.safe_load(saved.read_text())["train"]["max_steps"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None  # the loop says what is wrong with it
    if (run / "export" / "ldmkit_config.yaml").is_file():
        return steps, 0
    reached = [int(c.name.removeprefix("step-")) for c in (run / "checkpoints").glob("step-*") if c.name[5:].isdigit()]
    return steps, max(0, steps - max(reached, default=0))


def _started_stages(out: Path, method: str) -> dict[str, tuple[int, int]]:
    folders = {"vae": out / "vae", "teacher": out / "teacher", "distill": out / method}
    return {stage: p for stage, folder in folders.items() if (p := _stage_progress(folder)) is not None}


HELDOUT_IMAGES = 1000
"""Images of generated data kept out of every training stage: the label classifier learns from them."""


def stage_data(out: Path, plan: Plan, seed: int, user_data: str | None, kind: str = "shapes") -> Path:
    """The training data: the user's, or ``kind`` (shapes | glyphs) generated into ``out/data``; glyphs also
    get ``out/data-heldout`` (another seed), never trained on, for the label classifier."""
    if user_data:
        if not Path(user_data).exists() and "://" not in user_data:
            raise UserError(f"--data not found: {user_data}")
        return Path(user_data)
    from ldmkit.data.synth import write_dataset

    data = out / "data"
    folders = [(data, plan.num_images, seed)]
    if kind == "glyphs":  # labelled: the classifier's images
        folders.append((out / "data-heldout", HELDOUT_IMAGES, seed + 7919))
    for folder, num, s in folders:
        if (folder / "DONE").is_file():
            continue
        tmp = out / f".{folder.name}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_dataset(tmp, num=num, fmt="folder", size=plan.image_size, seed=s, kind=kind)
        (tmp / "DONE").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return data


def _captions(data: Path, limit: int = 20000) -> list[str]:
    return _read_captions(data, limit)[1]


def _read_captions(data: Path, limit: int = 20000) -> tuple[int, list[str]]:
    """(number of samples, their captions) of the first ``limit`` samples; map-style datasets count all."""
    from ldmkit.config import DataConfig
    from ldmkit.data import open_dataset

    ds = open_dataset(
        DataConfig(path=str(data), num_workers=0), seed=0, rank=0, world_size=1, batch_size=1, start_batch=0
    )
    captions: list[str] = []
    read = 0
    for i, load in ds.lazy_samples():
        if i >= limit:
            break
        sample = load()
        if sample is not None:
            read += 1
            captions += list(sample.captions)
    try:
        total = len(ds)
    except (TypeError, NotImplementedError):  # a stream (WebDataset): what was read
        total = read
    return max(total, read), captions


def data_size(data: Path) -> tuple[int, int, bool]:
    """(training images, distinct captions, whether they are class labels) that plan_for plans with."""
    from ldmkit.eval.adherence import labels_of

    num, captions = _read_captions(data)
    return num, len(set(captions)), labels_of(captions) is not None


TEXT_LAYERS = 2
TEXT_MAX_LENGTH = 32
"""The frozen random text encoder of free-form captions (the shapes): 2 CLIP layers, width 64, 32 tokens."""


def text_encoder_plan(captions: list[str]) -> tuple[dict[str, int], str]:
    """How the quickstart builds its text encoder for these captions (``write_text_components``'s
    ``num_layers`` and ``max_length``), and one sentence saying why.

    Class-labelled data (``labels_of``: a few distinct captions that differ in one word, e.g. the glyphs) gets
    an encoder without transformer layers (token + position embedding + final LayerNorm: the label's word stays
    its own vector at its own position) and a context as long as the longest caption, so that the label is one
    token of a few and not one of 32 mostly padding. Measured on 4000 glyph images (10 labels), the quickstart
    teacher (2000 steps, guided DDIM 50 steps), label accuracy of the held-out classifier on 120 samples (chance
    0.10): 2 layers, 32 tokens ~0.07; no layers, 32 tokens 0.53; 2 layers, 8 tokens 0.24; no layers, 8 tokens
    0.78 (0.54 with another seed; 1.00 and 0.98 with twice the steps: LABELLED_TEACHER_FACTOR). The random
    layers mix the one differing token into every position with weights nobody trained, and padding dilutes the
    attention the U-ViT must learn to put on it. Free-form captions keep the encoder the README's shapes figures
    were measured with.
    """
    from ldmkit.eval.adherence import labels_of
    from ldmkit.models.text import build_word_tokenizer

    if labels_of(captions) is None:
        return {"num_layers": TEXT_LAYERS, "max_length": TEXT_MAX_LENGTH}, ""
    distinct = sorted(set(captions))
    tokenizer = build_word_tokenizer(distinct, max_length=TEXT_MAX_LENGTH)
    longest = max(len(tokenizer(c).input_ids) for c in distinct)  # BOS + words + EOS
    max_length = min(TEXT_MAX_LENGTH, longest)
    return {"num_layers": 0, "max_length": max_length}, (
        f"The {len(distinct)} captions differ in one word (class labels): the text encoder has no transformer "
        f"layers (each word keeps its own embedding) and a context of {max_length} tokens, the longest caption, "
        "so the teacher can find the label (measured: configs/uvit/quickstart.yaml)."
    )


def stage_text(out: Path, data: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """The base folder (text encoder + tokenizer now, the VAE after its stage) and the separation figures,
    with the encoder's shape (``text_encoder_plan``) under ``encoder``."""
    from ldmkit.eval.text_probe import caption_separation
    from ldmkit.models.text import write_text_components

    base = out / "base"
    stats_file = base / "text_separation.json"
    if stats_file.is_file():
        return base, json.loads(stats_file.read_text())
    captions = _captions(data)
    shape, why = text_encoder_plan(captions)
    write_text_components(base, captions, hidden_size=64, seed=seed, **shape)
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldmkit.data.synth import parse_caption

    distinct = sorted(set(captions))
    stats = caption_separation(
        CLIPTextModel.from_pretrained(base / "text_encoder"),
        CLIPTokenizer.from_pretrained(base / "tokenizer"),
        distinct,
        {c: parse_caption(c) for c in distinct},
    )
    if stats.get("min_to_median_distance", 1.0) < 0.1:
        logger.warning(
            "the frozen text encoder separates some captions poorly (min/median distance %.3f)",
            stats["min_to_median_distance"],
        )
    stats["encoder"] = {**shape, "why": why}
    stats_file.write_text(json.dumps(stats, indent=1))
    return base, stats


def stage_vae(out: Path, data: Path, plan: Plan, base: Path) -> Path:
    export = _train(
        "vae/quickstart.yaml",
        [
            "--method.name=vae",
            f"--data.path={data}",
            f"--data.resolution={plan.image_size}",
            f"--train.max_steps={plan.vae_steps}",
            f"--output_dir={out / 'vae'}",
        ],
    )
    if not (base / "vae" / "config.json").is_file():
        # The base folder (text encoder, tokenizer, scheduler from stage_text) gets the trained VAE, so
        # the U-ViT stage and its exported pipeline read everything from one place.
        shutil.copytree(export, base / "vae", ignore=shutil.ignore_patterns("ldmkit_config.yaml"), dirs_exist_ok=True)
    return export


def stage_teacher(out: Path, data: Path, plan: Plan, base: Path) -> Path:
    return _train(
        "uvit/quickstart.yaml",
        [
            "--method.name=uvit",
            f"--model.pretrained={base}",
            f"--data.path={data}",
            f"--data.resolution={plan.image_size}",
            "--data.cache=true",
            f"--data.cache_dir={out / 'cache'}",
            f"--train.max_steps={plan.teacher_steps}",
            f"--output_dir={out / 'teacher'}",
        ],
    )


def stage_distill(
    out: Path, data: Path, plan: Plan, teacher: Path, method: str, overrides: tuple[str, ...] = ()
) -> Path:
    """``overrides``: more ``--section.key=value`` for the recipe (benchmarks/quickstart_spread.py: train.seed)."""
    return _train(
        f"{method}/quickstart.yaml",
        [
            f"--method.name={method}",
            f"--model.pretrained={teacher}",
            f"--data.path={data}",
            f"--data.resolution={plan.image_size}",
            "--data.cache=true",
            f"--data.cache_dir={out / 'cache'}",
            f"--train.max_steps={plan.distill_steps}",
            f"--output_dir={out / method}",
            *overrides,
        ],
    )


# ----------------------------------------------------------------------------------------------------
# Evaluation


def is_shapes_data(data: Path, limit: int = 500) -> bool:
    """Whether every caption (of the first ``limit``) is a shapes caption, as in ``ldmkit data synth``
    output passed with --data: then the report scores prompt adherence too."""
    from ldmkit.data.synth import parse_caption

    captions = _captions(data, limit)
    return bool(captions) and all(parse_caption(c) is not None for c in captions)


def stage_evaluate(
    out: Path, plan: Plan, teacher: Path, student: Path, method: str, data: Path, shapes: bool, seed: int
) -> dict[str, Any]:
    """The teacher with each training-free solver (``_evaluate_teacher``, cached per teacher) and the distilled
    model at ``plan.lcm_steps``, on the same prompts and seeds: the evaluation ``results`` of the report."""
    from ldmkit.data.synth import heldout_prompts
    from ldmkit.eval.distances import distances_to
    from ldmkit.eval.evaluate import evaluate_pipeline, read_data, read_images

    ev = _eval_dir(out, method)
    if shapes:
        prompts = heldout_prompts(plan.eval_prompts, seed=seed + 1)

        @cache
        def reference():  # FD/KID to the training distribution; read only when something is computed
            return read_images(data, plan.reference_images)
    else:
        images, prompts = read_data(data, max(plan.eval_prompts, plan.reference_images))
        prompts = prompts[: plan.eval_prompts]

        def reference():
            return images[: plan.reference_images]

    eval_seed = seed + 12345
    teacher_results = _evaluate_teacher(out, plan, teacher, prompts, reference, eval_seed, str(data))
    guidance, eta = _student_guidance(method, plan), _student_eta(student, method)
    key = {
        "student": _fingerprint(student),
        "method": method,
        "teacher_evaluation": teacher_results["key"],
        "steps": list(plan.lcm_steps),
        "guidance": guidance,
        "eta": eta,
    }
    result_file = ev / "results.json"
    student_results = _cached(result_file, key)
    if student_results is None:
        # Another student (retrained, other steps) or teacher evaluation: measure again, adherence too.
        shutil.rmtree(ev / "lcm", ignore_errors=True)
        (ev / "adherence.json").unlink(missing_ok=True)
        ev.mkdir(parents=True, exist_ok=True)
        student_pipe = _load_student(student, teacher, method)
        student_pipe.set_progress_bar_config(disable=True)
        run = evaluate_pipeline(
            student_pipe,
            prompts,
            list(plan.lcm_steps),
            guidance=guidance,
            seed=eval_seed,
            save_images=True,
            batch_size=24,
            reference=reference(),
            out_dir=ev / "lcm",
            eta=eta,
        )
        sets = {f"lcm_{s}": ev / "lcm" / f"steps-{s}" for s in plan.lcm_steps}
        student_results = {
            "key": key,
            "method": method,
            "run": run,
            "distance_to_teacher_50": distances_to(Path(teacher_results["reference_set"]), sets, len(prompts)),
        }
        _write_json(result_file, student_results)
    return {
        "prompts": prompts,
        "method": method,
        "runs": {**teacher_results["runs"], "lcm": student_results["run"]},
        "folders": {**teacher_results["folders"], "lcm": str(ev / "lcm")},
        "distance_to_teacher_50": {
            **teacher_results["distance_to_teacher_50"],
            **student_results["distance_to_teacher_50"],
        },
    }


def _evaluate_teacher(
    out: Path, plan: Plan, teacher: Path, prompts: list[str], reference, seed: int, data: str
) -> dict[str, Any]:
    """The teacher, guided, with DDIM at ``plan.lcm_steps`` and ``plan.teacher_steps_full`` (the reference set
    of every distance) and with each other solver of ``plan.teacher_solvers`` (DPM-Solver++ 2M, UniPC) at
    ``plan.lcm_steps``: the training-free way to sample in few steps that distillation has to beat. Cached in
    ``evaluate/teacher/`` under a key of the teacher's weights, prompts, seeds and steps, so every ``--method``
    distilled from this teacher in the same --out reuses it."""
    from ldmkit.eval.distances import distances_to
    from ldmkit.eval.evaluate import evaluate_solvers
    from ldmkit.inference import load_pipeline

    folder = out / "evaluate" / "teacher"
    solvers = ["ddim", *[s for s in plan.teacher_solvers if s != "ddim"]]
    steps = {s: sorted({*plan.lcm_steps, *([plan.teacher_steps_full] if s == "ddim" else [])}) for s in solvers}
    key = {
        "teacher": _fingerprint(teacher),
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "num_prompts": len(prompts),
        "seed": seed,
        "guidance": plan.teacher_guidance,
        "steps": steps,
        "data": data,
        "reference_images": plan.reference_images,
    }
    result_file = folder / "results.json"
    cached = _cached(result_file, key)
    if cached is not None:
        return cached
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pipe = load_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    common = dict(save_images=True, batch_size=24, reference=reference(), out_dir=folder)
    metrics = evaluate_solvers(pipe, ["ddim"], prompts, steps["ddim"], plan.teacher_guidance, seed, **common)
    if len(solvers) > 1:  # one call: the same steps for each
        metrics.update(
            evaluate_solvers(pipe, solvers[1:], prompts, steps[solvers[1]], plan.teacher_guidance, seed, **common)
        )
    reference_set = folder / "ddim" / f"steps-{plan.teacher_steps_full}"
    sets = {
        f"teacher_{s}_{n}": folder / s / f"steps-{n}"
        for s in solvers
        for n in steps[s]
        if (s, n) != ("ddim", plan.teacher_steps_full)
    }
    results = {
        "key": key,
        "runs": {f"teacher_{s}": metrics[s] for s in solvers},
        "folders": {f"teacher_{s}": str(folder / s) for s in solvers},
        "reference_set": str(reference_set),
        "distance_to_teacher_50": distances_to(reference_set, sets, len(prompts)),
    }
    _write_json(result_file, results)
    return results


def _fingerprint(folder: Path) -> str:
    """The identity of a model export: a hash of its weight files (names and bytes; a few MB here), so a
    cached evaluation is reused only for the very weights it measured."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(str(f.relative_to(folder)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _cached(file: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The results in ``file`` when they were measured with ``key`` (JSON-equal), else None."""
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except ValueError:
        return None
    return saved if saved.get("key") == json.loads(json.dumps(key)) else None


def _write_json(file: Path, data: dict[str, Any]) -> None:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(file)  # a run stopped while writing leaves no half file that looks cached


def stage_adherence(
    out: Path, plan: Plan, teacher: Path, student: Path, method: str, data: Path, seed: int
) -> dict[str, Any]:
    """Do samples follow their captions (eval/adherence.py)? Caption sensitivity of the teacher (guided,
    full steps) and of the distilled model (4 steps, or its largest step count below), and on labelled data
    a label classifier's accuracy on their samples next to its accuracy on real held-out images."""
    from ldmkit.eval.adherence import (
        SEEDS,
        caption_adherence,
        fit_label_classifier,
        labels_of,
        representative_steps,
        sensitivity_prompts,
    )
    from ldmkit.eval.evaluate import read_data
    from ldmkit.inference import load_pipeline, set_scheduler

    result_file = _eval_dir(out, method) / "adherence.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    captions = _captions(data)
    labels = labels_of(captions)
    prompts = sensitivity_prompts(captions)
    lcm_steps = representative_steps(plan.lcm_steps)
    result: dict[str, Any] = {"prompts": prompts, "seeds": SEEDS, "labels": labels, "models": {}}
    if len(prompts) < 2:  # one caption for every image: nothing to follow
        logger.info("caption adherence skipped: the data has fewer than 2 distinct captions")
        result_file.write_text(json.dumps(result, indent=1))
        return result
    teacher_pipe = load_pipeline(teacher)
    set_scheduler(teacher_pipe, "ddim")
    models = {
        f"teacher_{plan.teacher_steps_full}": (teacher_pipe, plan.teacher_steps_full, plan.teacher_guidance, None),
        f"lcm_{lcm_steps}": (
            _load_student(student, teacher, method),
            lcm_steps,
            _student_guidance(method, plan),
            _student_eta(student, method),
        ),
    }
    for pipe, *_ in models.values():
        pipe.set_progress_bar_config(disable=True)

    classifier = None
    if labels is not None:
        heldout = out / "data-heldout"
        held_out = (heldout / "DONE").is_file()
        # generated labelled data has its own held-out folder; the user's data: a split of it (the teacher saw
        # these images too: said in the report)
        images, caps = read_data(heldout, HELDOUT_IMAGES) if held_out else read_data(data, 2000)
        # the user's data may be grouped by label: shuffled before the split (the generated held-out set is
        # in random order already, and keeps its figures)
        classifier, real_accuracy = fit_label_classifier(labels, images, caps, seed=seed, shuffle=not held_out)
        result.update(
            classifier_real_accuracy=real_accuracy, chance=1 / len(labels), classifier_held_out_from_teacher=held_out
        )
    per_label = max(1, plan.eval_prompts // len(labels)) if labels is not None else 0
    for name, (pipe, steps, guidance, eta) in models.items():
        entry = caption_adherence(
            pipe,
            prompts,
            steps,
            guidance,
            seed + 4242,
            seeds=SEEDS,
            classifier=classifier,
            samples_per_label=per_label,
            label_seed=seed + 777,
            batch_size=24,
            eta=eta,
        )
        if entry["warning"]:
            logger.warning("%s: %s", name, entry["warning"])
        result["models"][name] = entry
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _eval_dir(out: Path, method: str) -> Path:
    # One folder per distillation method: `quickstart` then `quickstart --method tcd_lora` in the same --out
    # share data, VAE, teacher and its evaluation (evaluate/teacher), and each evaluates its own student.
    return out / "evaluate" / method


def _student_guidance(method: str, plan: Plan) -> float:
    # A full student embeds w (the pipeline passes guidance_scale - 1, as it was trained); a LoRA has w baked
    # in (w fixed in its recipe) and runs without CFG.
    return 1.0 if STUDENTS[method].lora else plan.teacher_guidance


def _student_eta(student: Path, method: str) -> float | None:
    """``eta`` of the student's sampler: TCD's gamma (TCDScheduler's stochastic step, TCD paper Algorithm 4)
    as the run's ``method.gamma`` says (its model card too); PCM samples deterministically edge to edge (eta 0,
    methods/pcm.py); LCMScheduler takes none."""
    if method.startswith("pcm"):
        return 0.0
    if not method.startswith("tcd"):
        return None
    import yaml

    from ldmkit.methods.configs import TCDKnobs

    saved = Path(student) / "ldmkit_config.yaml"
    knobs = (yaml.safe_load(saved.read_text()) or {}).get("method", {}) if saved.is_file() else {}
    return float(knobs.get("gamma", TCDKnobs.gamma))


def _load_student(student: Path, teacher: Path, method: str):
    from ldmkit.inference import load_lora, load_pipeline, set_scheduler

    # A full export is a pipeline with its run's scheduler (LCMScheduler; TCDScheduler for TCD and PCM); a
    # LoRA export is loaded onto the teacher with its sampler set first, so that load_lora adopts the
    # export's scheduler settings (original_inference_steps = the distillation grid, LCM's boundary scaling),
    # as ldmkit generate does.
    kind = STUDENTS[method]
    pipe = load_pipeline(teacher if kind.lora else student)
    set_scheduler(pipe, kind.sampler)
    if kind.lora:
        load_lora(pipe, student)
        pipe.fuse_lora()  # sample at the model's speed, as a merged export would (ldmkit merge-lora)
    return pipe


# ----------------------------------------------------------------------------------------------------


def _resolve_method(method: str | None, lcd: bool) -> str:
    if lcd and method not in (None, "lcd"):
        raise UserError(f"--lcd is --method lcd; it cannot go with --method {method}")
    method = method or ("lcd" if lcd else "lcm_lora")
    if method not in STUDENTS:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def quickstart(
    out: str | Path = "quickstart",
    quick: bool = False,
    lcd: bool = False,
    data: str | None = None,
    seed: int = 0,
    kind: str = "shapes",
    method: str | None = None,
    minutes: float | None = None,
) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the report dict written to report.json.
    ``method``: one of METHODS (default lcm_lora; ``lcd=True`` is ``method="lcd"``); ``minutes``: the
    budget ``plan_for`` plans the training steps within (default: what the full plan takes)."""
    from ldmkit.eval.report import summarise, write_report

    method = _resolve_method(method, lcd)
    out = Path(out).resolve()  # stage configs hold absolute paths: a re-run from another folder resumes
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn, *args):
        logger.info("quickstart stage %s", name)
        t0 = time.perf_counter()
        r = fn(*args)
        times[name] = time.perf_counter() - t0
        return r

    # Generated data has the plan's fixed size (FULL's 4000 images, --quick's 500); the steps follow the data.
    data_dir = timed("data", stage_data, out, QUICK if quick else FULL, seed, data, kind)
    num_images, num_captions, labelled = timed("plan", data_size, data_dir)
    plan, plan_reason = plan_for(
        num_images, num_captions, minutes, quick, method=method, done=_started_stages(out, method), labelled=labelled
    )
    logger.info("quickstart plan: %s", plan_reason)
    base, text_stats = timed("text", stage_text, out, data_dir, seed)
    if text_stats.get("encoder", {}).get("why"):
        plan_reason += " " + text_stats["encoder"]["why"]
    vae = timed("vae", stage_vae, out, data_dir, plan, base)
    teacher = timed("teacher", stage_teacher, out, data_dir, plan, base)
    student = timed("distill", stage_distill, out, data_dir, plan, teacher, method)
    shapes = (data is None and kind == "shapes") or is_shapes_data(data_dir)
    results = timed("evaluate", stage_evaluate, out, plan, teacher, student, method, data_dir, shapes, seed)
    adherence = timed("adherence", stage_adherence, out, plan, teacher, student, method, data_dir, seed)
    kind_of = STUDENTS[method]
    report = {
        "quick": quick,
        "method": method,
        "student": kind_of.label,
        "sampling": {  # how the student was sampled (and how to sample it: the report's "what next")
            "scheduler": kind_of.sampler,
            "eta": _student_eta(student, method),
            "guidance": _student_guidance(method, plan),
            "lora": kind_of.lora,
        },
        "plan": asdict(plan),
        "plan_reason": plan_reason,
        "exports": {
            "data": str(data_dir),
            "base": str(base),
            "vae": str(vae),
            "teacher": str(teacher),
            "distilled": str(student),
        },
        "text_separation": text_stats,
        "feature_net": results["runs"]["teacher_ddim"].get("feature_net"),
        "stage_seconds": times,
        "caption_adherence": adherence,
    }
    report["figures"] = summarise(results, report["plan"], method=method)
    report["seconds_total"] = time.perf_counter() - t_all
    write_report(out, report, results, _eval_dir(out, method))
    # Several methods may share one --out: report.html is the latest run's, reports/<method>/ keeps each one's.
    (out / "reports" / method).mkdir(parents=True, exist_ok=True)
    write_report(out / "reports" / method, report, results, _eval_dir(out, method))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="quickstart", help="Folder of every stage's output and the report.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="About a minute on a 2-core CPU (fewer images and steps; 66 s measured): CI and a first look.",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="Distillation method (default: lcm_lora): LCM-LoRA, full LCD, TCD or PCM as a LoRA or a full student. "
        "Several methods can share one --out: data, VAE, teacher and the teacher's evaluation are reused.",
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


def run(args: argparse.Namespace) -> int:
    from ldmkit.eval.report import display_name, table_rows

    report = quickstart(
        args.out,
        quick=args.quick,
        lcd=args.lcd,
        data=args.data,
        seed=args.seed,
        kind=args.kind,
        method=args.method,
        minutes=args.minutes,
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
