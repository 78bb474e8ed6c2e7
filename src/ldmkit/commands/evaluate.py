"""``ldmkit evaluate``: speed and quality per scheduler and step count (library: ldmkit.eval.evaluate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldmkit.diffusion.samplers import SCHEDULERS, TEACHER_SOLVERS
from ldmkit.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", required=True, help="Local diffusers pipeline folder (SD1.5, SDXL, U-ViT, or an ldmkit export).")
    add("--lora", default=None, help="LoRA file or folder to load on top (e.g. an LCM-LoRA).")
    add(
        "--no-fuse-lora",
        action="store_true",
        help="Keep the LoRA as separate peft layers; default: fuse it into the weights (what merge-lora saves), so "
        "speed figures measure the model rather than the unfused adapter's extra matmuls.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", default=None, help="Text file with one prompt per line.")
    src.add_argument(
        "--data",
        default=None,
        help="Dataset (folder, WebDataset shards, file list): its captions are the prompts and its "
        "images the FD/KID reference.",
    )
    src.add_argument(
        "--shapes", action="store_true", help="Held-out synthetic-shapes prompts (ldmkit data synth vocabulary)."
    )
    add("--steps", default="1,2,4,8", help="Comma-separated step counts to evaluate.")
    add("--scheduler", choices=list(SCHEDULERS), default=None, help="Sampler; default: the folder's own.")
    add(
        "--guidance",
        type=float,
        default=None,
        help="Guidance scale; default: the model's (1.0 for an LCM-LoRA, 8.0 for a full LCM, else 7.5).",
    )
    add(
        "--eta",
        type=float,
        default=None,
        help="eta of the sampler: TCD's gamma with --scheduler tcd (0.3 for TCD models, 0 for PCM); "
        "default: the pipeline's (0).",
    )
    add(
        "--teacher-solvers",
        nargs="?",
        const=",".join(TEACHER_SOLVERS),
        default=None,
        help="Also evaluate the teacher with these training-free solvers at the same steps and seeds "
        f"(comma-separated; the flag alone: {','.join(TEACHER_SOLVERS)} = DDIM, DPM-Solver++ 2M, UniPC), "
        "for equal-step and equal-compute (UNet evaluations) comparisons.",
    )
    add(
        "--teacher",
        default=None,
        help="Teacher pipeline folder for --teacher-solvers; default: --model (without the --lora).",
    )
    add(
        "--teacher-guidance",
        type=float,
        default=None,
        help="Guidance scale of the teacher's solvers; default: the teacher pipeline's default.",
    )
    add(
        "--num-images",
        type=int,
        default=100,
        help="Number of prompts (one image each); fewer if the file or data has fewer.",
    )
    add("--seed", type=int, default=0, help="Image i of every setting uses seed + i.")
    add("--batch-size", type=int, default=8, help="Prompts per pipeline call.")
    add("--height", type=int, default=None, help="Image height; default: the model's.")
    add("--width", type=int, default=None, help="Image width; default: the model's.")
    add(
        "--reference",
        default=None,
        help="Reference images for FD/KID: an image folder or a dataset (default with --data: the data's images).",
    )
    add("--max-reference", type=int, default=2000, help="Use at most this many reference images.")
    add(
        "--feature-net",
        default=None,
        help="Local TorchScript (.pt) or torch.export (.pt2) feature network for FD/KID, e.g. StyleGAN2-ADA's "
        "inception-2015-12-05.pt; default: ldmkit's weight-free random conv features (comparable only within ldmkit).",
    )
    add("--clip", default=None, help="Local transformers CLIP folder for CLIP score.")
    add("--save-images", action="store_true", help="Also write every generated image (steps-N/IIIII.png).")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    add(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="Weights dtype; auto: fp16 on CUDA, else fp32.",
    )
    add("--out", required=True, help="Output folder: metrics.json, quality_vs_steps.png, grid-steps-N.png.")


def run(args: argparse.Namespace) -> int:
    from ldmkit.commands.generate import prepare_sampler, sampling_defaults
    from ldmkit.data.synth import heldout_prompts
    from ldmkit.eval.evaluate import (
        ClipScorer,
        evaluate_pipeline,
        evaluate_solvers,
        parse_steps,
        read_data,
        read_images,
        read_prompts,
    )
    from ldmkit.eval.fid import load_feature_extractor
    from ldmkit.eval.plot import quality_vs_steps
    from ldmkit.inference import check_sampling, load_lora, load_pipeline, resolve_device, resolve_dtype

    steps = parse_steps(args.steps)
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    solvers = [s.strip() for s in args.teacher_solvers.split(",") if s.strip()] if args.teacher_solvers else []
    unknown = [s for s in solvers if s not in SCHEDULERS]
    if unknown or (args.teacher_solvers is not None and not solvers):
        raise UserError(f"--teacher-solvers: unknown solver(s) {unknown}; choose from {', '.join(SCHEDULERS)}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    reference = None
    if args.prompts:
        prompts = read_prompts(args.prompts)[: args.num_images]
    elif args.data:
        data_images, prompts = read_data(args.data, max(args.num_images, args.max_reference))
        prompts = prompts[: args.num_images]
        reference = data_images[: args.max_reference]
    else:
        prompts = heldout_prompts(args.num_images, args.seed)
    if args.reference:
        reference = read_images(args.reference, args.max_reference)
    features = load_feature_extractor(args.feature_net, device) if reference is not None else None
    clip = ClipScorer(args.clip, device) if args.clip else None

    pipe = load_pipeline(args.model, dtype)
    prepare_sampler(pipe, args.scheduler, args.lora)  # an LCM-LoRA export samples with LCM by default
    if args.lora:
        load_lora(pipe, args.lora)
        if not args.no_fuse_lora:
            pipe.fuse_lora()  # time the model as a merged export runs (ldmkit merge-lora)
    if args.guidance is None:
        args.guidance = sampling_defaults(pipe)[1]
    for n in steps:
        check_sampling(pipe, n, args.height, args.width)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    out = Path(args.out)
    common = dict(
        batch_size=args.batch_size,
        reference=reference,
        feature_extractor=features,
        clip=clip,
        height=args.height,
        width=args.width,
    )
    metrics = evaluate_pipeline(
        pipe,
        prompts,
        steps,
        args.guidance,
        args.seed,
        out_dir=out,
        save_images=args.save_images,
        eta=args.eta,
        **common,
    )
    metrics.update(
        model=str(args.model),
        lora=args.lora,
        lora_fused=bool(args.lora and not args.no_fuse_lora),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    label = (metrics["scheduler"] or "pipeline") + (" + LoRA" if args.lora else "")
    runs = {label: metrics["settings"]}
    if solvers:
        del pipe
        teacher = load_pipeline(args.teacher or args.model, dtype)
        teacher.to(device)
        teacher.set_progress_bar_config(disable=True)
        metrics["teacher"] = evaluate_solvers(
            teacher, solvers, prompts, steps, args.teacher_guidance, args.seed, out_dir=out / "teacher", **common
        )
        metrics["teacher_model"] = str(args.teacher or args.model)
        runs.update({f"teacher {name}": m["settings"] for name, m in metrics["teacher"].items()})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    quality_vs_steps(runs).save(out / "quality_vs_steps.png")
    quality_vs_steps(runs, x="unet_evals_per_image").save(out / "quality_vs_unet_evals.png")
    _print_table(label, metrics["settings"])
    for name, m in metrics.get("teacher", {}).items():
        _print_table(f"teacher {name} (guidance {m['guidance']})", m["settings"])
    print(f"wrote {out / 'metrics.json'}, {out / 'quality_vs_steps.png'} and {out / 'quality_vs_unet_evals.png'}")
    return 0


def _print_table(label: str, settings: list[dict]) -> None:
    print(label)
    print(f"{'steps':>5} {'s/img':>8} {'evals/img':>9} {'adherence':>9} {'FD':>9} {'KID':>9} {'CLIP':>6}")
    for s in settings:
        adh = s["adherence"]["all"] if s["adherence"] else None
        cells = [
            _cell(adh, 9, ".3f"),
            _cell(s["fd"], 9, ".3f"),
            _cell(s["kid"], 9, ".4f"),
            _cell(s["clip_score"], 6, ".2f"),
        ]
        print(f"{s['steps']:>5} {s['seconds_per_image']:>8.4f} {s['unet_evals_per_image']:>9.1f} " + " ".join(cells))


def _cell(v: float | None, width: int, fmt: str) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"
