"""``ldmkit generate``: text-to-image with a local SD1.5 / SDXL / U-ViT folder, optional LoRA.

The command only: loading, samplers, LoRA and the seed rule are ``ldmkit.inference``.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--steps", type=int, default=25, help="Sampling steps (2-8 for LCM models).")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="Guidance scale (1.0-2.0 for LCM-LoRA, about 8 for full LCM)."
    )
    parser.add_argument(
        "--scheduler", choices=list(SCHEDULERS), default=None, help="Sampler; default: the folder's own."
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


def run(args: argparse.Namespace) -> int:
    from ldmkit.inference import (
        generate_images,
        image_grid,
        load_lora,
        load_pipeline,
        resolve_device,
        resolve_dtype,
        set_scheduler,
    )

    if args.steps < 1 or args.num_images < 1:
        raise UserError("--steps and --num-images must be at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, dtype)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    if args.lora:
        load_lora(pipe, args.lora, args.lora_scale)
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
    )
    out = Path(args.out)
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
