"""The quickstart's stages and their order (``quickstart``): each writes its own folder under ``--out``, is
skipped when its output exists, and resumes through the training loop's checkpoints when interrupted."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

from ldmkit.errors import UserError
from ldmkit.quickstart.cache import cached, fingerprint, read_json, text_fingerprint, write_json
from ldmkit.quickstart.plan import FULL, QUICK, Plan, for_objective, plan_for
from ldmkit.quickstart.students import (
    load_student,
    resolve_method,
    student_eta,
    student_guidance,
    student_label,
    student_sampling,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Stage helpers


def _train(method_recipe: str, overrides: list[str]) -> Path:
    """Run (or resume, or skip when finished) one training stage through the shared loop. Stages draw no
    validation grids (the report's evaluation replaces them); their TensorBoard logs are in <stage>/logs."""
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    cfg = load_config(method_recipe, [*overrides, "--train.validate_every=0"])
    return train(cfg)


def _started_stages(out: Path, method: str) -> dict[str, tuple[int, int]]:
    """The training stages already started in ``out``: stage -> (train.max_steps it was started with, steps
    still to train). A re-run (another --method, other --minutes) keeps what a stage was started with (the loop
    refuses a lower max_steps, and a finished teacher is shared by every method)."""
    from ldmkit.train.runs import run_progress

    folders = {"vae": out / "vae", "teacher": out / "teacher", "distill": out / method}
    started = {}
    for stage, folder in folders.items():
        progress = run_progress(folder)
        if progress is not None:
            step, max_steps = progress
            started[stage] = (max_steps, max(0, max_steps - step))
    return started


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
    saved = read_json(stats_file)
    if saved is not None:
        return base, saved
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
    write_json(stats_file, stats)
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


def _recipe(method: str, objective: str) -> str:
    """The quickstart recipe of ``method`` for a teacher of ``objective``: ``<method>/quickstart_flow.yaml`` for a
    flow teacher where the method ships one, else ``<method>/quickstart.yaml``."""
    from ldmkit.config import RECIPES

    if objective == "flow" and (RECIPES / method / "quickstart_flow.yaml").is_file():
        return f"{method}/quickstart_flow.yaml"
    return f"{method}/quickstart.yaml"


OBJECTIVE_FILE = "objective.txt"
"""In --out: the objective its teacher was trained with (eps, flow), so that runs of the other one are refused."""


def check_objective(out: Path, objective: str) -> None:
    """Refuse to mix objectives in one --out (its teacher, and every student and evaluation built on it, is of
    one); record the objective of a new --out. An --out of an earlier release (a teacher, no record) is eps."""
    record = out / OBJECTIVE_FILE
    if record.is_file():
        held = record.read_text().strip()
    elif (out / "teacher").exists():
        held = "eps"
    else:
        record.write_text(objective + "\n")
        return
    if held != objective:
        raise UserError(
            f"--out {out} holds a quickstart with --objective {held}; use another --out for --objective {objective}"
        )
    if not record.is_file():
        record.write_text(held + "\n")


def stage_teacher(out: Path, data: Path, plan: Plan, base: Path) -> Path:
    return _train(
        _recipe("uvit", plan.objective),
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
        _recipe(method, plan.objective),
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
    guidance, eta = student_guidance(student, method, plan.teacher_guidance), student_eta(student, method)
    key = {
        "student": fingerprint(student),
        "method": method,
        "teacher_evaluation": teacher_results["key"],
        "steps": list(plan.lcm_steps),
        "guidance": guidance,
        "eta": eta,
    }
    result_file = ev / "results.json"
    student_results = cached(result_file, key)
    if student_results is None:
        # Another student (retrained, other steps) or teacher evaluation: measure again, adherence too.
        shutil.rmtree(ev / "lcm", ignore_errors=True)
        (ev / "adherence.json").unlink(missing_ok=True)
        ev.mkdir(parents=True, exist_ok=True)
        student_pipe = load_student(student, teacher, method)
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
        write_json(result_file, student_results)
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
    """The teacher, guided, with ``plan.reference_solver`` (DDIM; a flow teacher's Euler) at ``plan.lcm_steps`` and
    ``plan.teacher_steps_full`` (the reference set of every distance) and with each other solver of
    ``plan.teacher_solvers`` (DPM-Solver++ 2M, UniPC; a flow teacher's Heun, DPM-Solver++ 2M and UniPC on flow
    sigmas) at ``plan.lcm_steps``: the training-free way to sample in few steps that distillation has to beat. Cached in
    ``evaluate/teacher/`` under a key of the teacher's weights, prompts, seeds and steps, so every ``--method``
    distilled from this teacher in the same --out reuses it."""
    from ldmkit.eval.distances import distances_to
    from ldmkit.eval.evaluate import evaluate_solvers
    from ldmkit.inference import load_pipeline

    folder = out / "evaluate" / "teacher"
    ref = plan.reference_solver
    solvers = [ref, *[s for s in plan.teacher_solvers if s != ref]]
    steps = {s: sorted({*plan.lcm_steps, *([plan.teacher_steps_full] if s == ref else [])}) for s in solvers}
    key = {
        "teacher": fingerprint(teacher),
        "prompts": text_fingerprint(prompts),
        "num_prompts": len(prompts),
        "seed": seed,
        "guidance": plan.teacher_guidance,
        "steps": steps,
        "data": data,
        "reference_images": plan.reference_images,
    }
    result_file = folder / "results.json"
    saved = cached(result_file, key)
    if saved is not None:
        return saved
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pipe = load_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    common = dict(save_images=True, batch_size=24, reference=reference(), out_dir=folder)
    metrics = evaluate_solvers(pipe, [ref], prompts, steps[ref], plan.teacher_guidance, seed, **common)
    if len(solvers) > 1:  # one call: the same steps for each
        metrics.update(
            evaluate_solvers(pipe, solvers[1:], prompts, steps[solvers[1]], plan.teacher_guidance, seed, **common)
        )
    reference_set = folder / ref / f"steps-{plan.teacher_steps_full}"
    sets = {
        f"teacher_{s}_{n}": folder / s / f"steps-{n}"
        for s in solvers
        for n in steps[s]
        if (s, n) != (ref, plan.teacher_steps_full)
    }
    results = {
        "key": key,
        "runs": {f"teacher_{s}": metrics[s] for s in solvers},
        "folders": {f"teacher_{s}": str(folder / s) for s in solvers},
        "reference_set": str(reference_set),
        "distance_to_teacher_50": distances_to(reference_set, sets, len(prompts)),
    }
    write_json(result_file, results)
    return results


def stage_adherence(
    out: Path, plan: Plan, teacher: Path, student: Path, method: str, data: Path, seed: int
) -> dict[str, Any]:
    """Do samples follow their captions (eval/adherence.py)? Caption sensitivity of the teacher (guided,
    full steps) and of the distilled model (4 steps, or its largest step count below, and 1 step), and on labelled data
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
    saved = read_json(result_file)
    if saved is not None:  # measured for this very student: stage_evaluate removes it for another one
        return saved
    captions = _captions(data)
    labels = labels_of(captions)
    prompts = sensitivity_prompts(captions)
    lcm_steps = representative_steps(plan.lcm_steps)
    result: dict[str, Any] = {"prompts": prompts, "seeds": SEEDS, "labels": labels, "models": {}}
    if len(prompts) < 2:  # one caption for every image: nothing to follow
        logger.info("caption adherence skipped: the data has fewer than 2 distinct captions")
        write_json(result_file, result)
        return result
    teacher_pipe = load_pipeline(teacher)
    set_scheduler(teacher_pipe, plan.reference_solver)
    student_pipe = load_student(student, teacher, method)
    guidance, eta = student_guidance(student, method, plan.teacher_guidance), student_eta(student, method)
    models = {
        f"teacher_{plan.teacher_steps_full}": (teacher_pipe, plan.teacher_steps_full, plan.teacher_guidance, None),
        f"lcm_{lcm_steps}": (student_pipe, lcm_steps, guidance, eta),
    }
    if 1 in plan.lcm_steps and lcm_steps != 1:  # one step too, what one-step methods (DMD2) are judged at; cheap
        models["lcm_1"] = (student_pipe, 1, guidance, eta)
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
    write_json(result_file, result)
    return result


def _eval_dir(out: Path, method: str) -> Path:
    # One folder per distillation method: `quickstart` then `quickstart --method tcd_lora` in the same --out
    # share data, VAE, teacher and its evaluation (evaluate/teacher), and each evaluates its own student.
    return out / "evaluate" / method


# ----------------------------------------------------------------------------------------------------


def quickstart(
    out: str | Path = "quickstart",
    quick: bool = False,
    lcd: bool = False,
    data: str | None = None,
    seed: int = 0,
    kind: str = "shapes",
    method: str | None = None,
    minutes: float | None = None,
    objective: str = "eps",
) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the report dict written to report.json.
    ``method``: one of ``student_methods()`` (default lcm_lora; ``lcd=True`` is ``method="lcd"``); ``minutes``: the
    budget ``plan_for`` plans the training steps within (default: what the full plan takes); ``objective``: the
    teacher's, eps or flow (one per --out)."""
    from ldmkit.eval.report import summarise, write_report

    for_objective(FULL, objective)  # an unknown objective: one line, before any work
    method = resolve_method(method, lcd, objective)
    out = Path(out).resolve()  # stage configs hold absolute paths: a re-run from another folder resumes
    out.mkdir(parents=True, exist_ok=True)
    check_objective(out, objective)
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
    plan = for_objective(plan, objective)
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
    report = {
        "quick": quick,
        "objective": objective,
        "method": method,
        "student": student_label(method),
        "sampling": student_sampling(student, method, plan.teacher_guidance),
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
        "feature_net": results["runs"][f"teacher_{plan.reference_solver}"].get("feature_net"),
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
