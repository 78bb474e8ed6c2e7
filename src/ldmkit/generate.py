"""``ldmkit generate``: text-to-image with a local SD1.5 / SDXL / U-ViT folder, optional LoRA.

Everything runs through stock diffusers pipelines and schedulers (our own pipeline only for U-ViT),
so what this command shows is what users of the exported models get.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ldmkit.compat import dtype_kwargs
from ldmkit.errors import UserError

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; anything else is passed to torch.device."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline for a local folder: the class named in model_index.json (SD, SDXL, ...), or
    ldmkit's UViTPipeline, which diffusers does not know."""
    from diffusers import DiffusionPipeline

    root = Path(model)
    if not (root / "model_index.json").exists():
        raise UserError(f"--model is not a diffusers pipeline folder (no model_index.json): {root}")
    cls_name = json.loads((root / "model_index.json").read_text()).get("_class_name")
    if cls_name == "UViTPipeline":
        from ldmkit.pipelines.uvit import UViTPipeline  # optional component, imported only when needed

        return UViTPipeline.from_pretrained(root, **dtype_kwargs(dtype))
    return DiffusionPipeline.from_pretrained(root, **dtype_kwargs(dtype))


def set_scheduler(pipe, name: str) -> None:
    """Swap in a stock scheduler built from the loaded one's config, so betas, prediction_type and (for
    an LCM folder) original_inference_steps / timestep_scaling carry over."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def lora_location(path: str | Path) -> tuple[Path, str]:
    """(folder, weight_name) for ``load_lora_weights`` from a LoRA file or a folder holding one."""
    p = Path(path)
    if p.is_file():
        return p.parent, p.name
    if not p.is_dir():
        raise UserError(f"--lora not found: {p}")
    if (p / "pytorch_lora_weights.safetensors").exists():
        return p, "pytorch_lora_weights.safetensors"
    files = sorted(p.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(
            f"--lora folder must hold pytorch_lora_weights.safetensors or exactly one .safetensors file: {p}"
        )
    return p, files[0].name


def load_lora(pipe, path: str | Path, scale: float = 1.0) -> None:
    """Load a diffusers/peft- or kohya-format LoRA file into ``pipe`` (diffusers converts kohya keys)."""
    folder, weight_name = lora_location(path)
    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="default")
    if scale != 1.0:
        pipe.set_adapters(["default"], adapter_weights=[scale])
    _adopt_lcm_settings(pipe, folder)


def _adopt_lcm_settings(pipe, lora_folder: Path) -> None:
    """An ldmkit LCM-LoRA export carries the LCMScheduler of its run (original_inference_steps = the
    distillation's num_ddim_timesteps, timestep_scaling): sampling with a different grid or boundary
    scaling than the LoRA was trained on degrades few-step images. Adopt those two settings when the
    pipeline samples with an LCMScheduler; the base model's betas and prediction type stay."""
    from diffusers import LCMScheduler

    cfg_file = lora_folder / "scheduler" / "scheduler_config.json"
    if not isinstance(pipe.scheduler, LCMScheduler) or not cfg_file.is_file():
        return
    trained = json.loads(cfg_file.read_text())
    keep = {k: trained[k] for k in ("original_inference_steps", "timestep_scaling") if k in trained}
    if keep:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **keep)


def generate_images(
    pipe,
    prompts: list[str],
    steps: int,
    guidance: float,
    seed: int,
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
) -> list[Any]:
    """``num_images`` PIL images per prompt, prompt-major. Image j of prompt i uses its own CPU generator
    seeded ``seed + i * num_images + j``, so each image is reproducible on any device and batch size."""
    accepted = inspect.signature(pipe.__call__).parameters
    images = []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator("cpu").manual_seed(seed + i * num_images + j) for j in range(num_images)]
        kwargs: dict[str, Any] = dict(
            prompt=prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            num_images_per_prompt=num_images,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
        )
        # Only pass what this pipeline takes (U-ViT's pipeline has a smaller signature).
        kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
        images += pipe(**kwargs).images
    return images


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
    from diffusers.utils import make_image_grid

    if args.steps < 1 or args.num_images < 1:
        raise UserError("--steps and --num-images must be at least 1")
    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32
    )
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
    make_image_grid(images, rows=len(args.prompt), cols=args.num_images).save(out / "grid.png")
    settings = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}
    settings.update(
        device=str(device), dtype=str(dtype).removeprefix("torch."), scheduler_class=type(pipe.scheduler).__name__
    )
    (out / "generate.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"wrote {len(images)} images to {out}")
    return 0
