"""``ldmkit convert-lora --in FILE --to kohya|diffusers --out FILE``: rewrite a LoRA in another layout.

Reads what ``ldmkit.lora.formats`` reads (every layout diffusers' ``load_lora_weights`` reads: peft /
diffusers, old diffusers, mixed files, kohya with diffusers or original-SD block names, text-encoder
keys, PaddleMIX ``lcm_lora.safetensors``; plus the reference script's ``base_model.model.`` keys and U-ViT
kohya files) and writes with ``ldmkit.lora.export``, the exporter of ``ldmkit train``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument


def _model_info(model_dir: str) -> tuple[list[str], object | None, bool]:
    """(the denoiser's module names, its UNet config or None for a U-ViT, SDXL?) from the config alone
    (weights are not loaded: built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from ldmkit.models.uvit import UViT

    root = Path(model_dir)
    sub = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (sub / "config.json").is_file():
        raise UserError(f"no UNet config.json in {model_dir} (nor in {model_dir}/unet)")
    is_uvit = json.loads((sub / "config.json").read_text()).get("_class_name") == "UViT"
    cls = UViT if is_uvit else UNet2DConditionModel
    with init_empty_weights():
        model = cls.from_config(cls.load_config(sub))
    names = [n for n, _ in model.named_modules()]
    if is_uvit:
        return names, None, False
    return names, model.config, model.config.addition_embed_type == "text_time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--in",
        dest="input",
        required=True,
        help="LoRA .safetensors file (or a folder holding pytorch_lora_weights.safetensors).",
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=("kohya", "diffusers"),
        help="Layout to write: kohya (lora_unet_* / lora_te*_*, with .alpha) or diffusers (unet.*.lora_A/lora_B).",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="Output .safetensors file, or a folder (gets pytorch_lora_weights[_kohya].safetensors).",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Optional model folder: check the LoRA's modules exist in its UNet / U-ViT; needed for kohya files "
        "with original SD block names (input_blocks_*); lays out the SDXL kohya names written (default: SDXL's UNet).",
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ldmkit import outputs
    from ldmkit.lora import export, formats

    # The output is one file (a folder --out receives it under its standard name): an existing one, --in
    # itself included, is replaced only with --overwrite, and then only once the new one is complete.
    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out / (export.KOHYA_WEIGHT_NAME if args.to == "kohya" else export.LORA_WEIGHT_NAME)
    outputs.check(out, "convert-lora", kind="file", overwrite=args.overwrite)
    state_dict = formats.load_lora_file(args.input)
    names, unet_config, sdxl = _model_info(args.model) if args.model else (None, None, None)
    components = formats.read_lora(
        state_dict, unet_config=unet_config, uvit_names=names if unet_config is None else None
    )
    if names is not None:
        formats.check_modules(components, "unet", names)
    if sdxl is None:  # no model: SDXL when the file has the second text encoder
        sdxl = "text_encoder_2" in components or any(k.startswith(("lora_te1_", "lora_te2_")) for k in state_dict)
    with outputs.staged(out, "convert-lora", kind="file") as tmp:
        if args.to == "diffusers":
            export.save_diffusers(tmp, components, StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline)
        else:
            export.save_kohya(tmp, components, sdxl, unet_config)
    layers = [layer for c in components.values() for layer in c.values()]
    ranks = sorted({layer.rank for layer in layers})
    scales = sorted({round(layer.scale, 6) for layer in layers})
    print(
        f"wrote {out}: {len(layers)} modules ({', '.join(components)}), {args.to} layout, rank {ranks}, "
        f"alpha/rank {scales}"
    )
    return 0
