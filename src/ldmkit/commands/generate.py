"""``ldmkit generate``: text-to-image with a local SD1.5 / SDXL / U-ViT folder, optional LoRA.

The command only: loading, samplers, LoRA and the seed rule are ``ldmkit.inference``.
"""

from __future__ import annotations

import argparse
import json
import math

from ldmkit.diffusion.samplers import SCHEDULERS
from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Model: a diffusers folder (SD1.5, SDXL, U-ViT, an ldmkit export), a single file or a cached repo id; "
        "an ldmkit LoRA export alone loads onto the base its record names.",
    )
    parser.add_argument(
        "--lora", default=None, help="LoRA file or folder (diffusers/peft or kohya format) to load on top."
    )
    parser.add_argument("--lora-scale", type=float, default=1.0, help="Strength of the LoRA.")
    parser.add_argument(
        "--tokenizer", default=None, help="Tokenizer folder for a single-file --model (default: the HF cache)."
    )
    parser.add_argument(
        "--components-from",
        default=None,
        help="For a single FLUX / SD3 transformer file as --model: the diffusers folder or cached repo id of its "
        "text encoders, VAE and scheduler (default: the released model in the HF cache).",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="Allow a pickled .ckpt --model (it can run code when loaded)."
    )
    parser.add_argument("--prompt", action="append", required=True, help="Prompt (repeat for several).")
    parser.add_argument("--negative-prompt", default=None, help="Negative prompt for every image.")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Sampling steps; default: the export's (its ldmkit_sampling.json), else 4 for LCM/TCD samplers, else 25.",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="Guidance scale; default: the export's, else 1.0 for an LCM-LoRA (no CFG pass), 8.0 for a full LCM, else 7.5.",
    )
    parser.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=None,
        help="Sampler; default: the one the export saved (LCM, TCD, ...), else the model folder's own.",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="eta of the sampler: TCD's gamma (0 deterministic); default: the export's (TCD: its gamma, PCM: 0), "
        "else the pipeline's.",
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
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ldmkit.inference import (
        check_sampling,
        generate_images,
        image_grid,
        load_export,
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
    from ldmkit import inputs, outputs

    inputs.check_arguments(args, devices=("--device",), seeds=("--seed",))
    inputs.check_image_size(args.height, args.width, args.num_images, args.device)  # one prompt per call
    outputs.verify(("--model", args.model), ("--lora", args.lora))  # an export that changed since it was written
    # generate.json is generate's own record: a re-run may write into its earlier output
    out = outputs.check(args.out, "generate", overwrite=args.overwrite, own=("generate.json",))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # The export's sampling record (scheduler, steps, guidance, eta) decides what the flags leave open.
    single = dict(
        allow_pickle=args.allow_pickle, tokenizer=args.tokenizer, components_from=args.components_from
    )  # a single-file base's needs
    if args.lora:
        pipe, sampling = load_export(
            args.lora, base=args.model, dtype=dtype, scheduler=args.scheduler, lora_scale=args.lora_scale, **single
        )
    else:
        pipe, sampling = load_export(args.model, dtype=dtype, scheduler=args.scheduler, **single)
    args.steps = sampling.steps if args.steps is None else args.steps
    args.guidance = sampling.guidance if args.guidance is None else args.guidance
    args.eta = sampling.eta if args.eta is None else args.eta
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
