"""``ldmkit convert-lora --in FILE --to kohya|diffusers --out FILE``: rewrite a LoRA in another layout.

Reads what ``ldmkit.lora.formats`` reads (every layout diffusers' ``load_lora_weights`` reads: peft /
diffusers, old diffusers, mixed files, kohya with diffusers or original-SD block names, text-encoder
keys, PaddleMIX ``lcm_lora.safetensors``; plus the reference script's ``base_model.model.`` keys and U-ViT
kohya files) and writes with ``ldmkit.lora.export``, the exporter of ``ldmkit train``.

FLUX.1 and SD3 LoRAs (``--model`` a FLUX / SD3 folder or cached repo id) convert between diffusers' layout and
the original (BFL / SAI MMDiT) one that ComfyUI, Forge and sd-scripts read (``--to kohya``: fused projections,
``ldmkit.lora.flux_layout`` / ``sd3_layout``, the copy ``ldmkit train`` writes); the model's configs lay out the
names, its weights are never loaded (the modules are built on the meta device).
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


FLOW_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")


def _flow_pipeline(model: str):
    """A stand-in for the FLUX / SD3 pipeline of ``model`` for reading and writing its LoRAs: the transformer and
    text encoders built from their configs on the meta device (no weights), the pipeline class's LoRA reader;
    None when ``model`` is not a FLUX / SD3 folder."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from ldmkit.families import resolve_model

    root = resolve_model(model, what="--model")
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    if index.get("_class_name") not in FLOW_PIPELINES:
        return None
    cls = getattr(diffusers, index["_class_name"])
    pipe = type("MetaPipeline", (), {"lora_state_dict": staticmethod(cls.lora_state_dict), "pipeline_class": cls})()
    with init_empty_weights():
        for name, spec in index.items():
            if name == "transformer" or name.startswith("text_encoder"):
                lib = diffusers if spec[0] == "diffusers" else transformers
                part_cls = getattr(lib, spec[1])
                config = (
                    part_cls.load_config(root / name)
                    if lib is diffusers
                    else part_cls.config_class.from_pretrained(root / name)
                )
                setattr(pipe, name, part_cls.from_config(config) if lib is diffusers else part_cls(config))
    return pipe


def _convert_flow(args, pipe, out: Path) -> tuple[dict, Path]:
    """Read the file for the FLUX / SD3 stand-in ``pipe`` (either layout; every module checked against the
    model) and write it in the layout ``--to`` names."""
    from ldmkit import outputs
    from ldmkit.lora import export, formats

    components = formats.read_for_pipeline(pipe, formats.load_lora_file(args.input))
    with outputs.staged(out, "convert-lora", kind="file") as tmp:
        if args.to == "diffusers":
            export.save_diffusers(tmp, components, pipe.pipeline_class)
        else:
            export.save_kohya_copy(tmp, components, pipe.pipeline_class, pipe.transformer)
    return components, out


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
        "with original SD block names (input_blocks_*); lays out the SDXL kohya names written (default: SDXL's UNet). "
        "Required for FLUX / SD3 LoRAs (a folder or cached repo id): --to kohya writes the original BFL / SAI layout.",
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
    flow = _flow_pipeline(args.model) if args.model else None
    if flow is not None:
        components, _ = _convert_flow(args, flow, out)
        return _report(out, args.to, components)
    state_dict = formats.load_lora_file(args.input)
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_joint_blocks_", "transformer.")) for k in state_dict):
        raise UserError(
            "this is a FLUX / SD3 LoRA: give the model it is for (--model, a diffusers folder or cached repo id), "
            "whose config lays out the original names"
        )
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
    return _report(out, args.to, components)


def _report(out: Path, to: str, components: dict) -> int:
    layers = [layer for c in components.values() for layer in c.values()]
    ranks = sorted({layer.rank for layer in layers})
    scales = sorted({round(layer.scale, 6) for layer in layers})
    print(
        f"wrote {out}: {len(layers)} modules ({', '.join(components)}), {to} layout, rank {ranks}, alpha/rank {scales}"
    )
    return 0
