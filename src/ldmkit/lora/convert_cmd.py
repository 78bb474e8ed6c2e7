"""``ldmkit convert-lora --in FILE --to kohya|diffusers --out FILE``: rewrite a UNet LoRA in another layout.

Reads every layout of ``ldmkit.lora.formats`` (peft/diffusers, the reference script's
``base_model.model.`` keys, old diffusers, mixed files, kohya, PaddleMIX ``lcm_lora.safetensors``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.lora import formats


def _module_names(model_dir: str) -> list[str]:
    """The UNet's module names, from its config alone (weights are not loaded: built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    root = Path(model_dir)
    sub = "unet" if (root / "unet" / "config.json").is_file() else None
    if not (root / (sub or "") / "config.json").is_file():
        raise UserError(f"no UNet config.json in {model_dir} (nor in {model_dir}/unet)")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder=sub))
    return [n for n, _ in unet.named_modules()]


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
        help="Layout to write: kohya (lora_unet_*, with .alpha) or diffusers (unet.*.lora_A/lora_B).",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="Output .safetensors file, or a folder (gets pytorch_lora_weights[_kohya].safetensors).",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Optional model folder: resolve kohya module names exactly against its UNet and check they exist.",
    )


def run(args: argparse.Namespace) -> int:
    names = _module_names(args.model) if args.model else None
    layers = formats.read_lora(formats.load_lora_file(args.input), names)
    out = formats.save_lora(layers, args.out, to=args.to)
    ranks = sorted({layer.rank for layer in layers.values()})
    scales = sorted({round(layer.scale, 6) for layer in layers.values()})
    print(f"wrote {out}: {len(layers)} modules, {args.to} layout, rank {ranks}, alpha/rank {scales}")
    return 0
