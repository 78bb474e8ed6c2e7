"""``ldmkit generate``: text-to-image with a local SD1.5 / SDXL / U-ViT folder, optional LoRA.

The command only: loading, samplers, LoRA and the seed rule are ``ldmkit.inference``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ldmkit.diffusion.samplers import SCHEDULERS
from ldmkit.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="Local diffusers pipeline folder (SD1.5, SDXL, U-ViT, or an ldmkit export)."
    )
    parser.add_argument(
        "--lora", default=None, help="LoRA file or folder (diffusers/peft or kohya format) to load on top."
    )
    parser.add_argument("--lora-scale", type=float, default=1.0, help="Strength of the LoRA.")
    parser.add_argument("--prompt", action="append", required=True, help="Prompt (repeat for several).")
    parser.add_argument("--negative-prompt", default=None, help="Negative prompt for every image.")
    parser.add_argument(
        "--steps", type=int, default=None, help="Sampling steps; default: 4 for an LCM model or LCM-LoRA, else 25."
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="Guidance scale; default: 1.0 for an LCM-LoRA (no CFG pass), 8.0 for a full LCM, else 7.5.",
    )
    parser.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=None,
        help="Sampler; default: the folder's own, or lcm for an LCM-LoRA export (it carries an LCMScheduler).",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="eta of the sampler: TCD's gamma with --scheduler tcd (0.3 for TCD models, 0 deterministic, for PCM); "
        "default: the pipeline's (0).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first image; image k uses seed + k.")
    parser.add_argument("--num-images", type=int, default=1, help="Images per prompt.")
    parser.add_argument("--height", type=int, default=None, help="Image height in pixels; default: the model's.")
    parser.add_argument("--width", type=int, default=None, help="Image width in pixels; default: the model's.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="Weights dtype; auto: fp16 on CUDA, else fp32.",
    )
    parser.add_argument("--out", required=True, help="Output folder for NNN.png, grid.png and generate.json.")


def is_lcm_lora_export(lora: str | None) -> bool:
    """An ldmkit LCM-LoRA export: its folder carries the LCMScheduler of the run."""
    if not lora:
        return False
    folder = Path(lora) if Path(lora).is_dir() else Path(lora).parent
    cfg = folder / "scheduler" / "scheduler_config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "LCMScheduler"


def prepare_sampler(pipe, scheduler: str | None, lora: str | None) -> None:
    """The sampler: --scheduler, else LCM for an LCM-LoRA export, else the folder's own (before the LoRA
    is loaded, so that load_lora adopts the export's LCM settings)."""
    from ldmkit.inference import set_scheduler

    if scheduler:
        set_scheduler(pipe, scheduler)
    elif is_lcm_lora_export(lora):
        set_scheduler(pipe, "lcm")


def sampling_defaults(pipe) -> tuple[int, float]:
    """(steps, guidance) that suit the model: an LCM sampler 4 steps, at 8.0 for a full LCM (guidance is
    embedded, w = 7) or 1.0 for an LCM-LoRA (no classifier-free guidance pass); else 25 steps at 7.5."""
    from diffusers import LCMScheduler

    if isinstance(pipe.scheduler, LCMScheduler):
        unet = getattr(pipe, "unet", None)
        embedded = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None
        return 4, 8.0 if embedded else 1.0
    return 25, 7.5


def run(args: argparse.Namespace) -> int:
    from ldmkit.inference import (
        check_sampling,
        generate_images,
        image_grid,
        load_lora,
        load_pipeline,
        resolve_device,
        resolve_dtype,
    )

    if (args.steps is not None and args.steps < 1) or args.num_images < 1:
        raise UserError("--steps and --num-images must be at least 1")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    if not math.isfinite(args.lora_scale):
        raise UserError(f"--lora-scale must be a finite number, got {args.lora_scale}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, dtype)
    prepare_sampler(pipe, args.scheduler, args.lora)
    if args.lora:
        load_lora(pipe, args.lora, args.lora_scale)
    steps, guidance = sampling_defaults(pipe)
    args.steps = steps if args.steps is None else args.steps
    args.guidance = guidance if args.guidance is None else args.guidance
    check_sampling(pipe, args.steps, args.height, args.width)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    images = generate_images(
        pipe,
        args.prompt,
        args.steps,
        args.guidance,
        args.seed,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        eta=args.eta,
    )
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(out / f"{i:03d}.png")
    image_grid(images, cols=args.num_images).save(out / "grid.png")  # a row per prompt
    settings = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    settings.update(
        device=str(device), dtype=str(dtype).removeprefix("torch."), scheduler_class=type(pipe.scheduler).__name__
    )
    (out / "generate.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {len(images)} images to {out}")
    return 0
