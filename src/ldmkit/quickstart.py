"""``ldmkit quickstart``: from nothing to a measured few-step model on a CPU.

Stages (each writes its own folder under ``--out``, is skipped when its output exists, and resumes
through the training loop's checkpoints when interrupted):

1. ``data``     synthetic coloured shapes with scoreable captions (or the user's ``--data``)
2. ``text``     a frozen text encoder + word-level tokenizer built offline, and how well it separates captions
3. ``vae``      an AutoencoderKL trained from scratch (``vae`` method)
4. ``teacher``  a U-ViT trained from scratch on cached latents (``uvit`` method)
5. ``distill``  LCM-LoRA (default) or full LCD (``--lcd``) of the teacher
6. ``evaluate`` teacher at 50 and 4 steps vs the LCM at 1, 2, 4 (and 8) steps: prompt adherence, distance
                to the teacher's 50-step images from the same noise, speed
7. ``report``   ``report.html`` (grids, plots, table) and ``report.json`` (figures + every stage's export)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
)


# ----------------------------------------------------------------------------------------------------
# Stage helpers


def _train(method_recipe: str, overrides: list[str]) -> Path:
    """Run (or resume, or skip when finished) one training stage through the shared loop. Stages draw no
    validation grids (the report's evaluation replaces them); their TensorBoard logs are in <stage>/logs."""
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    cfg = load_config(method_recipe, [*overrides, "--train.validate_every=0"])
    return train(cfg)


def _method(lcd: bool) -> str:
    return "lcd" if lcd else "lcm_lora"


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
    from ldmkit.config import DataConfig
    from ldmkit.data import open_dataset

    ds = open_dataset(
        DataConfig(path=str(data), num_workers=0), seed=0, rank=0, world_size=1, batch_size=1, start_batch=0
    )
    captions: list[str] = []
    for i, load in ds.lazy_samples():
        if i >= limit:
            break
        sample = load()
        if sample is not None:
            captions += list(sample.captions)
    return captions


def stage_text(out: Path, data: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """The base folder (text encoder + tokenizer now, the VAE after its stage) and the separation figures."""
    from ldmkit.eval.text_probe import caption_separation
    from ldmkit.models.text import write_text_components

    base = out / "base"
    stats_file = base / "text_separation.json"
    if stats_file.is_file():
        return base, json.loads(stats_file.read_text())
    captions = _captions(data)
    write_text_components(base, captions, hidden_size=64, num_layers=2, max_length=32, seed=seed)
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


def stage_distill(out: Path, data: Path, plan: Plan, teacher: Path, lcd: bool) -> Path:
    method = _method(lcd)
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
    out: Path, plan: Plan, teacher: Path, student: Path, lcd: bool, data: Path, shapes: bool, seed: int
) -> dict[str, Any]:
    from ldmkit.data.synth import heldout_prompts
    from ldmkit.eval.distances import distances_to
    from ldmkit.eval.evaluate import evaluate_pipeline, read_data, read_images
    from ldmkit.inference import load_pipeline, set_scheduler

    ev = _eval_dir(out, lcd)
    result_file = ev / "results.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    ev.mkdir(parents=True, exist_ok=True)
    if shapes:
        prompts = heldout_prompts(plan.eval_prompts, seed=seed + 1)
        reference = read_images(data, plan.reference_images)  # FD/KID to the training distribution
    else:
        reference, prompts = read_data(data, max(plan.eval_prompts, plan.reference_images))
        prompts = prompts[: plan.eval_prompts]
    common = dict(seed=seed + 12345, save_images=True, batch_size=24, reference=reference)

    teacher_pipe = load_pipeline(teacher)
    set_scheduler(teacher_pipe, "ddim")
    teacher_pipe.set_progress_bar_config(disable=True)
    runs: dict[str, Any] = {}
    runs["teacher_ddim"] = evaluate_pipeline(
        teacher_pipe,
        prompts,
        sorted({4, plan.teacher_steps_full}),
        guidance=plan.teacher_guidance,
        out_dir=ev / "teacher_ddim",
        **common,
    )
    student_pipe = _load_student(student, teacher, lcd)
    student_pipe.set_progress_bar_config(disable=True)
    runs["lcm"] = evaluate_pipeline(
        student_pipe, prompts, list(plan.lcm_steps), guidance=_student_guidance(lcd, plan), out_dir=ev / "lcm", **common
    )

    sets = {
        "teacher_4": ev / "teacher_ddim" / "steps-4",
        **{f"lcm_{s}": ev / "lcm" / f"steps-{s}" for s in plan.lcm_steps},
    }
    distances = distances_to(ev / "teacher_ddim" / f"steps-{plan.teacher_steps_full}", sets, len(prompts))
    results = {"prompts": prompts, "runs": runs, "distance_to_teacher_50": distances}
    result_file.write_text(json.dumps(results, indent=1))
    return results


def stage_adherence(
    out: Path, plan: Plan, teacher: Path, student: Path, lcd: bool, data: Path, seed: int
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

    result_file = _eval_dir(out, lcd) / "adherence.json"
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
        f"teacher_{plan.teacher_steps_full}": (teacher_pipe, plan.teacher_steps_full, plan.teacher_guidance),
        f"lcm_{lcm_steps}": (_load_student(student, teacher, lcd), lcm_steps, _student_guidance(lcd, plan)),
    }
    for pipe, _, _ in models.values():
        pipe.set_progress_bar_config(disable=True)

    classifier = None
    if labels is not None:
        heldout = out / "data-heldout"
        held_out = (heldout / "DONE").is_file()
        # generated labelled data has its own held-out folder; the user's data: a split of it (the teacher saw
        # these images too: said in the report)
        images, caps = read_data(heldout, HELDOUT_IMAGES) if held_out else read_data(data, 2000)
        classifier, real_accuracy = fit_label_classifier(labels, images, caps, seed=seed)
        result.update(
            classifier_real_accuracy=real_accuracy, chance=1 / len(labels), classifier_held_out_from_teacher=held_out
        )
    per_label = max(1, plan.eval_prompts // len(labels)) if labels is not None else 0
    for name, (pipe, steps, guidance) in models.items():
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
        )
        if entry["warning"]:
            logger.warning("%s: %s", name, entry["warning"])
        result["models"][name] = entry
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _eval_dir(out: Path, lcd: bool) -> Path:
    # One folder per distillation method: `quickstart` then `quickstart --lcd` in the same --out share
    # data, VAE and teacher, and each evaluates its own student.
    return out / "evaluate" / _method(lcd)


def _student_guidance(lcd: bool, plan: Plan) -> float:
    # Full LCD embeds w (the pipeline passes guidance_scale - 1); LCM-LoRA bakes w in and runs without CFG.
    return plan.teacher_guidance if lcd else 1.0


def _load_student(student: Path, teacher: Path, lcd: bool):
    from ldmkit.inference import load_lora, load_pipeline, set_scheduler

    # A full-LCD export is a pipeline with its run's LCMScheduler; an LCM-LoRA export is loaded onto the
    # teacher, and load_lora adopts the export's LCMScheduler settings (grid, boundary scaling).
    pipe = load_pipeline(student if lcd else teacher)
    set_scheduler(pipe, "lcm")
    if not lcd:
        load_lora(pipe, student)
        pipe.fuse_lora()  # sample at the model's speed, as a merged export would (ldmkit merge-lora)
    return pipe


# ----------------------------------------------------------------------------------------------------


def quickstart(
    out: str | Path = "quickstart",
    quick: bool = False,
    lcd: bool = False,
    data: str | None = None,
    seed: int = 0,
    kind: str = "shapes",
) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the report dict written to report.json."""
    from ldmkit.eval.report import summarise, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if quick else FULL
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn, *args):
        logger.info("quickstart stage %s", name)
        t0 = time.perf_counter()
        r = fn(*args)
        times[name] = time.perf_counter() - t0
        return r

    data_dir = timed("data", stage_data, out, plan, seed, data, kind)
    base, text_stats = timed("text", stage_text, out, data_dir, seed)
    vae = timed("vae", stage_vae, out, data_dir, plan, base)
    teacher = timed("teacher", stage_teacher, out, data_dir, plan, base)
    student = timed("distill", stage_distill, out, data_dir, plan, teacher, lcd)
    shapes = (data is None and kind == "shapes") or is_shapes_data(data_dir)
    results = timed("evaluate", stage_evaluate, out, plan, teacher, student, lcd, data_dir, shapes, seed)
    adherence = timed("adherence", stage_adherence, out, plan, teacher, student, lcd, data_dir, seed)
    report = {
        "quick": quick,
        "method": _method(lcd),
        "plan": asdict(plan),
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
    report["figures"] = summarise(results, report["plan"])
    report["seconds_total"] = time.perf_counter() - t_all
    write_report(out, report, results, _eval_dir(out, lcd))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="quickstart", help="Folder of every stage's output and the report.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="About a minute on a 2-core CPU (fewer images and steps; 66 s measured): CI and a first look.",
    )
    parser.add_argument(
        "--lcd",
        action="store_true",
        help="Distill a full LCD student (guidance embedding, EMA target) instead of an LCM-LoRA.",
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
    report = quickstart(args.out, quick=args.quick, lcd=args.lcd, data=args.data, seed=args.seed, kind=args.kind)
    figs = report["figures"]
    for name in ["teacher_50", "teacher_4"] + [k for k in figs if k.startswith("lcm_") and k[4:].isdigit()]:
        f = figs[name]
        adh = f"adherence {f['adherence']:.3f}  " if f["adherence"] is not None else ""
        print(f"{name:>11}: {adh}{f['seconds_per_image'] * 1000:7.1f} ms/image")
    for name, entry in report["caption_adherence"]["models"].items():
        acc = f", label accuracy {entry['label_accuracy']:.2f}" if "label_accuracy" in entry else ""
        print(f"{name:>11}: caption sensitivity {entry['sensitivity']:.2f}{acc}")
        if entry["warning"]:
            print(f"WARNING {name}: {entry['warning']}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
