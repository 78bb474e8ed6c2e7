"""``ldmkit merge-lora --model DIR --lora FILE_OR_DIR [--scale S] --out DIR``: bake a LoRA into the UNet
(or the U-ViT of a UViTPipeline folder) and the text encoders when the file adapts them.

The file is read by ``ldmkit.lora.formats`` (every layout ``load_lora_weights`` reads, and ldmkit's extra
ones) and merged by diffusers: ``load_lora_weights`` + ``fuse_lora(lora_scale=S)`` + ``unload_lora_weights``.

The result is a complete pipeline folder of the model's class that needs no LoRA loading (e.g. for
export to other runtimes). For a few-step LoRA the scheduler matters as much as the weights: ``--scheduler
auto`` uses the scheduler saved next to the LoRA by ``ldmkit train`` (LCMScheduler or TCDScheduler, carrying the
run's original_inference_steps and timestep_scaling), ``lcm`` builds an LCMScheduler from the model's noise
schedule and the flags, ``keep`` leaves the model's scheduler. The LoRA's sampling record (steps, guidance,
eta) goes with the merged model: ``ldmkit_sampling.json`` in the folder, or the single file's metadata. ``--single-file OUT.safetensors`` writes the merged
model as one original-layout checkpoint for A1111 / ComfyUI / sd-scripts instead (families/single_file.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Base model: a diffusers folder (SD1.x/2.x, SDXL, or an ldmkit UViTPipeline), a single-file "
        "SD1.x/SD2.x/SDXL .safetensors, or a Hugging Face repo id (owner/name[@revision]) in the local cache.",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="Allow a pickled .ckpt --model (it can run code when loaded)."
    )
    parser.add_argument(
        "--tokenizer", default=None, help="Tokenizer folder for a single-file --model (default: the HF cache)."
    )
    parser.add_argument(
        "--lora",
        required=True,
        help="LoRA .safetensors (diffusers, peft or kohya layout; UNet and text encoders) or a folder with "
        "pytorch_lora_weights.safetensors.",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="Multiplier of the LoRA update (W += scale * alpha/r * up @ down)."
    )
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="Folder to write the merged pipeline to.")
    out.add_argument(
        "--single-file",
        metavar="OUT.safetensors",
        help="Write the merged model as one original-layout checkpoint (A1111, ComfyUI, sd-scripts) instead.",
    )
    parser.add_argument(
        "--scheduler",
        choices=("auto", "lcm", "keep"),
        default="auto",
        help="auto: the scheduler saved with the LoRA (LCM, TCD) if any, else keep; lcm: an LCMScheduler "
        "from the model's schedule and the two flags below; keep: the model's scheduler.",
    )
    parser.add_argument(
        "--original-inference-steps",
        type=int,
        default=None,
        help="LCMScheduler original_inference_steps (the run's num_ddim_timesteps); default: from the LoRA's scheduler, else 50.",
    )
    parser.add_argument(
        "--timestep-scaling",
        type=float,
        default=None,
        help="LCMScheduler timestep_scaling (the run's timestep_scaling_factor); default: from the LoRA's scheduler, else 10.",
    )
    add_overwrite_argument(parser)


def _saved_scheduler_config(lora: Path) -> dict | None:
    """The scheduler config saved next to an ldmkit LoRA export (its run's sampler), or None."""
    path = lora / "scheduler" / "scheduler_config.json" if lora.is_dir() else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _merged_record(lora: Path, pipe):
    """The LoRA's sampling record as the merged model's: a whole pipeline now, sampled with what it was saved
    with (the scheduler in the folder), at the LoRA's steps, guidance and eta."""
    from dataclasses import replace

    from ldmkit.inference import read_sampling_record

    record = read_sampling_record(lora)
    if record is None:
        return None
    eta = record.eta if type(pipe.scheduler).__name__ == record.scheduler else None
    return replace(record, kind="pipeline", base=None, scheduler=type(pipe.scheduler).__name__, eta=eta)


def _choose_scheduler(pipe, lora: Path, args: argparse.Namespace) -> None:
    """--scheduler auto | lcm | keep (module docstring)."""
    import diffusers

    from ldmkit.diffusion.lcm import lcm_scheduler

    saved = _saved_scheduler_config(lora)
    mode = args.scheduler if args.scheduler != "auto" else ("saved" if saved else "keep")
    if mode == "saved" and getattr(diffusers, saved.get("_class_name", ""), None) is not None:
        pipe.scheduler = getattr(diffusers, saved["_class_name"]).from_config(saved)
    if mode == "lcm":
        lcm_saved = saved if (saved or {}).get("_class_name") == "LCMScheduler" else None
        steps = args.original_inference_steps or (saved or {}).get("original_inference_steps", 50)
        scaling = args.timestep_scaling or (lcm_saved or {}).get("timestep_scaling", 10.0)
        pipe.scheduler = lcm_scheduler(saved or dict(pipe.scheduler.config), steps, scaling)


def merge(pipe, state_dict: dict, scale: float = 1.0) -> int:
    """Fold the LoRA in ``state_dict`` into ``pipe``'s weights (``W += scale * alpha/r * up @ down``) with
    diffusers' fuse_lora; returns the number of merged modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ldmkit.lora import formats

    components = formats.read_for_pipeline(pipe, state_dict)
    pipe.load_lora_weights(formats.peft_state_dict(components), adapter_name="merge")
    n = sum(isinstance(m, BaseTunerLayer) for name in components for m in getattr(pipe, name).modules())
    if n != sum(len(layers) for layers in components.values()):
        raise UserError(f"only {n} of the LoRA's modules were adapted by load_lora_weights")
    pipe.fuse_lora(components=list(components), lora_scale=scale, adapter_names=["merge"])
    pipe.unload_lora_weights()
    return n


def _check_target(model: Path, target: Path) -> None:
    """The merged model never overwrites the base model or lands inside it, and never replaces a file."""
    if model.exists():
        base = model.resolve()
        where = target.resolve()
        if where == base or (base.is_dir() and where.is_relative_to(base)):
            raise UserError(f"the output {target} is, or is inside, --model {model}: choose another place")
    if target.suffix != ".safetensors" and target.is_file():
        raise UserError(f"--out {target} is a file; give a folder")


def run(args: argparse.Namespace) -> int:
    from diffusers import LCMScheduler

    from ldmkit import inputs, outputs
    from ldmkit.families.single_file import save_single_file
    from ldmkit.inference import load_pipeline
    from ldmkit.lora import formats
    from ldmkit.models.uvit import UViT

    model, lora = Path(args.model), Path(args.lora)
    if args.single_file and not args.single_file.endswith(".safetensors"):
        raise UserError(f"--single-file must end in .safetensors: {args.single_file}")
    _check_target(model, Path(args.single_file or args.out))
    out_kind, option = ("file", "--single-file") if args.single_file else ("folder", "--out")
    outputs.verify(("--model", args.model), ("--lora", args.lora))  # an export that changed since it was written
    outputs.check(args.single_file or args.out, "merge-lora", kind=out_kind, option=option, overwrite=args.overwrite)
    inputs.check_arguments(args, positive=("--timestep-scaling",), counts=("--original-inference-steps",))
    if not math.isfinite(args.scale):
        raise UserError(f"--scale must be a finite number, got {args.scale}")
    state_dict = formats.load_lora_file(lora)
    # the class in model_index.json, UViTPipeline included; single files and repo ids resolve to a folder
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)
    if args.single_file and isinstance(pipe.unet, UViT):
        raise UserError("--single-file is for SD1.x/SD2.x/SDXL models; a U-ViT has no original single-file layout")
    n = merge(pipe, state_dict, args.scale)

    _choose_scheduler(pipe, lora, args)
    record = _merged_record(lora, pipe)
    target = args.single_file or args.out
    with outputs.staged(target, "merge-lora", kind=out_kind) as tmp:
        if args.single_file:
            save_single_file(pipe, tmp, record=record)
        else:
            pipe.save_pretrained(tmp)
            if record is not None:
                record.save(tmp)
    kind = type(pipe.scheduler).__name__
    extra = ""
    if isinstance(pipe.scheduler, LCMScheduler):
        c = pipe.scheduler.config
        extra = f" (original_inference_steps={c.original_inference_steps}, timestep_scaling={c.timestep_scaling})"
    print(f"merged {n} LoRA modules (scale {args.scale}) into {model.name}; saved to {target} with {kind}{extra}")
    return 0
