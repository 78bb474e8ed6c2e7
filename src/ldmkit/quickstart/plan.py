"""The quickstart's plan: how many steps each training stage gets, from the data and the minutes allowed
(``plan_for``), with the per-step times it was measured from and one paragraph saying why."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ldmkit.diffusion.samplers import FLOW_TEACHER_SOLVERS, TEACHER_SOLVERS
from ldmkit.errors import UserError
from ldmkit.quickstart.students import student_is_lora, student_label


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
    """Training-free solvers the teacher is evaluated with at ``lcm_steps`` (``reference_solver`` always: at
    ``teacher_steps_full`` it gives the reference set every distance is measured to)."""
    objective: str = "eps"
    """The teacher's training objective: eps (DDPM epsilon prediction) or flow (rectified flow, SD3's)."""
    reference_solver: str = "ddim"
    """The solver of the teacher's full-step reference set: DDIM on a DDPM teacher, flow-matching Euler on a flow."""


OBJECTIVES = ("eps", "flow")
"""``ldmkit quickstart --objective``: the teacher's training objective."""


def for_objective(plan: Plan, objective: str) -> Plan:
    """``plan`` for a teacher trained with ``objective``: a flow teacher is compared with the flow solvers
    (FLOW_TEACHER_SOLVERS: Euler, Heun, DPM-Solver++ and UniPC on flow sigmas; a plan with one solver, --quick,
    keeps one: Euler) and its reference set is Euler's. The steps stay: a flow step costs what an eps step does
    (the same network and batch; the loss differs in a few elementwise operations)."""
    if objective == "eps":
        return plan
    if objective != "flow":
        raise UserError(f"unknown --objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    solvers = FLOW_TEACHER_SOLVERS if len(plan.teacher_solvers) > 1 else FLOW_TEACHER_SOLVERS[:1]
    return replace(plan, objective="flow", reference_solver=FLOW_TEACHER_SOLVERS[0], teacher_solvers=solvers)


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
    from ldmkit.methods import get_config_class

    # A method whose steps cost more than LCM's says so on its config (a ClassVar: no torch for --help).
    cost = getattr(get_config_class(method), "quickstart_step_cost", 1.0)
    distill = LORA_STEP_SECONDS * (1.0 if student_is_lora(method) else FULL_STUDENT_RATIO) * cost
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
    steps = {"vae": FULL.vae_steps, "teacher": teacher, "distill": FULL.distill_steps * _distill_factor(method)}
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
    The default (no minutes, 4000 images, 120 captions) is exactly FULL (a method with a
    ``quickstart_distill_factor``: FULL with that share of its distillation steps).
    """
    if quick:
        return _quick_plan(num_images)
    if num_images < 1:
        raise UserError("the training data has no readable images")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"--minutes must be a positive number, got {minutes}")
    done = done or {}
    n = num_images
    captions = min(max(num_distinct_captions, 1), n)
    wanted = _useful_steps(n, captions, labelled, method)
    useful = dict(wanted.steps)
    for stage, (steps, _) in done.items():
        useful[stage] = steps
    left = {s: float(done[s][1]) if s in done else useful[s] for s in STAGES}

    default_budget = minutes is None
    budget = 60 * (full_plan_minutes(method, labelled) if default_budget else minutes)
    needed = _seconds(useful, method, n, left)
    todo = [s for s in STAGES if s not in done]
    fit = _fit_budget(useful, todo, needed, budget, method)
    plan_steps = {s: (int(fit.steps[s]) if s in done else _round_steps(fit.steps[s])) for s in STAGES}
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
        f"{student_label(method)} distillation: VAE {plan_steps['vae']} steps ({passes['vae']:.1f} passes over the "
        f"data), teacher {plan_steps['teacher']} ({passes['teacher']:.1f} passes), distillation "
        f"{plan_steps['distill']} ({passes['distill']:.1f} passes); about {estimate:.1f} min on a 2-core CPU at 1 "
        "thread, where the per-step times were measured (other machines differ)."
    ]
    if default_budget:
        kind = " for class-labelled data" if labelled else ""
        text.append(f"No --minutes: the budget is what the full plan{kind} takes there, {budget / 60:.1f} min.")
    text += _data_reasons(n, captions, labelled, wanted)
    text += [_done_reason(stage, *progress) for stage, progress in done.items()]
    budget_reason = _budget_reason(fit, todo, plan_steps, left, method, n, budget, needed, estimate)
    if budget_reason:
        text.append(budget_reason)
    return plan, " ".join(text)


def _quick_plan(num_images: int) -> tuple[Plan, str]:
    """``--quick``'s fixed plan, whatever the data and the minutes."""
    return replace(QUICK, num_images=num_images), (
        f"--quick: fixed small sizes (VAE {QUICK.vae_steps}, teacher {QUICK.teacher_steps}, distillation "
        f"{QUICK.distill_steps} steps, {QUICK.eval_prompts} evaluation prompts; {QUICK.num_images} images when "
        "generated) to check that every stage runs; neither the data nor --minutes changes them."
    )


@dataclass
class _Wanted:
    """The steps the data is worth to each stage before any budget (``_useful_steps``), and why."""

    steps: dict[str, float]
    image_factor: float
    """sqrt(images / REFERENCE_IMAGES): every stage's growth with the data."""
    caption_factor: float
    """sqrt(distinct captions / REFERENCE_CAPTIONS), at least 1: the teacher's further growth."""
    capped: list[str]
    """Stages held to MAX_PASSES over small data."""
    memorise: list[str]
    """Stages whose floor alone passes over the data more often than that."""


def _distill_factor(method: str) -> float:
    from ldmkit.methods import get_config_class

    # A method whose useful distillation is shorter than LCM's says so on its config (a ClassVar, measured).
    return getattr(get_config_class(method), "quickstart_distill_factor", 1.0)


def _useful_steps(n: int, captions: int, labelled: bool, method: str = "lcm_lora") -> _Wanted:
    """Each stage's useful steps for ``n`` images with ``captions`` distinct captions (``plan_for``'s rules:
    FULL's steps grown with roots of the data, held to MAX_PASSES, not below MIN_STEPS; the distillation's
    scaled by the method's ``quickstart_distill_factor``)."""
    image_factor = math.sqrt(n / REFERENCE_IMAGES)
    caption_factor = math.sqrt(max(1.0, captions / REFERENCE_CAPTIONS))
    full = {
        "vae": FULL.vae_steps,
        "teacher": FULL.teacher_steps,
        "distill": FULL.distill_steps * _distill_factor(method),
    }
    label_factor = LABELLED_TEACHER_FACTOR if labelled else 1.0
    growth = {"vae": image_factor, "teacher": image_factor * caption_factor * label_factor}
    growth["distill"] = image_factor * math.sqrt(caption_factor)
    wanted = _Wanted({}, image_factor, caption_factor, capped=[], memorise=[])
    for stage in STAGES:
        want = full[stage] * growth[stage]
        cap = MAX_PASSES[stage] * n / BATCH[stage]
        if want > cap:
            want = 10 * math.floor(cap / 10)  # the plan's steps are whole tens: stay under the cap
            wanted.capped.append(stage)
        if want < MIN_STEPS[stage]:
            if cap < MIN_STEPS[stage]:
                wanted.memorise.append(stage)
            want = MIN_STEPS[stage]
        wanted.steps[stage] = want
    return wanted


@dataclass
class _Fit:
    """The useful steps fitted into the budget (``_fit_budget``)."""

    steps: dict[str, float]
    scale: float = 1.0
    """The one factor the stages still to train were scaled by (1: they fit as they are)."""
    too_small: bool = False
    """Even their floors overrun the budget: every stage still to train runs at MIN_STEPS."""


def _fit_budget(useful: dict[str, float], todo: list[str], needed: float, budget: float, method: str) -> _Fit:
    """``useful`` steps within ``budget`` seconds when they take ``needed``: every stage in ``todo`` is scaled
    by one factor, and a stage that would drop below its floor is held at MIN_STEPS (the others share what
    is left)."""
    fit = _Fit(dict(useful))
    if not (needed > budget * (1 + 1e-9) and todo):
        return fit
    per_step = _step_seconds(method)
    # what the budget cannot shrink: evaluation, the rest, the latent cache, stages already under way
    fixed = needed - sum(useful[s] * per_step[s] for s in todo)
    floored: set[str] = set()
    while True:
        free = [s for s in todo if s not in floored]
        room = budget - fixed - sum(MIN_STEPS[s] * per_step[s] for s in floored)
        fit.scale = room / sum(useful[s] * per_step[s] for s in free) if free else 0.0
        low = [s for s in free if useful[s] * fit.scale < MIN_STEPS[s]]
        if not low:
            break
        floored.update(low)
    for s in todo:
        fit.steps[s] = MIN_STEPS[s] if s in floored else useful[s] * fit.scale
    fit.too_small = not [s for s in todo if s not in floored]
    return fit


def _data_reasons(n: int, captions: int, labelled: bool, wanted: _Wanted) -> list[str]:
    """The plan's sentences about the data: class labels, how its size scaled the steps, small data."""
    text = []
    if labelled:
        text.append(
            f"The captions are class labels (they differ in one word): the teacher trains {LABELLED_TEACHER_FACTOR:g} "
            "times longer, since a label carried by one token is learned late."
        )
    if n == REFERENCE_IMAGES and captions <= REFERENCE_CAPTIONS:
        why = "4000 images: the data size the full plan was tuned on (4000 shapes images, 120 captions)"
        if captions < REFERENCE_CAPTIONS:
            why += "; fewer distinct captions do not lower the steps (they need not mean simpler images)"
        text.append(why + ".")
    else:
        why = (
            f"The full plan's steps were tuned on 4000 images with 120 captions; {n} images scale them by "
            f"{wanted.image_factor:.2f}"
        )
        if wanted.caption_factor > 1:
            why += f", and {captions} captions the teacher's by a further {wanted.caption_factor:.2f}"
        text.append(why + " (square roots: more data needs more steps, with diminishing returns).")
    memorise = wanted.memorise
    capped = [s for s in wanted.capped if s not in memorise]
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
    return text


def _done_reason(stage: str, steps_done: int, steps_left: int) -> str:
    """The plan's sentence about a stage already started in this --out."""
    state = "trained" if steps_left == 0 else f"started ({steps_left} steps to go)"
    return (
        f"The {_STAGE_NAMES[stage]} was already {state} in this folder with {steps_done} steps: kept (another "
        "--out, or removing that stage's folder, plans it anew)."
    )


def _budget_reason(
    fit: _Fit,
    todo: list[str],
    plan_steps: dict[str, int],
    left: dict[str, float],
    method: str,
    n: int,
    budget: float,
    needed: float,
    estimate: float,
) -> str | None:
    """The plan's sentence about the budget: too small even for the floors, scaled down to fit, or more than
    the data needs (None: it fits as planned)."""
    if fit.too_small:
        floor_minutes = (
            _seconds(
                {s: float(MIN_STEPS[s]) if s in todo else float(plan_steps[s]) for s in STAGES},
                method,
                n,
                {s: float(MIN_STEPS[s]) if s in todo else left[s] for s in STAGES},
            )
            / 60
        )
        return (
            f"The budget of {budget / 60:.1f} min is too small: the minimum useful steps (VAE {MIN_STEPS['vae']}, "
            f"teacher {MIN_STEPS['teacher']}, distillation {MIN_STEPS['distill']}) take about {floor_minutes:.1f} min; "
            "running those."
        )
    if fit.scale < 1.0:
        return (
            f"All of that would take about {needed / 60:.1f} min; to fit {budget / 60:.1f} min the stages still to "
            f"train get {fit.scale:.0%} of their steps"
            + (" (a stage at its minimum keeps it)" if any(fit.steps[s] == MIN_STEPS[s] for s in todo) else "")
            + "."
        )
    if estimate < budget / 60 * 0.9:
        return (
            f"That is less than the {budget / 60:.1f} min allowed: the plan does not grow past the steps measured "
            "on the shapes (full LCD gained nothing from 1500 to 3000 distillation steps; what the 2000-step teacher "
            "reaches over seeds is in the README)."
        )
    return None


_STAGE_NAMES = {"vae": "VAE", "teacher": "teacher", "distill": "distillation"}


def _listed(stages: list[str], values: dict[str, Any] | None = None) -> str:
    """ "VAE, teacher and distillation", or their values "20, 60 and 40"."""
    words = [str(values[s]) if values is not None else _STAGE_NAMES[s] for s in stages]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
