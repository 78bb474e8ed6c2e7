"""The one LoRA exporter: what ``lora``, ``lcm_lora`` and ``convert-lora`` write.

A LoRA is held per pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``) as
``{module path: LoraLayer(down, up, alpha)}``: ``down`` is peft's ``lora_A`` / kohya's ``lora_down``
([r, in] or [r, in, kh, kw]), ``up`` is ``lora_B`` / ``lora_up`` ([out, r] or [out, r, 1, 1]) and the
weight update is ``W += (alpha / r) * up @ down``.

Two files are written next to each other:
- ``pytorch_lora_weights.safetensors`` by the pipeline class's own ``save_lora_weights`` from peft keys
  (``unet.<module>.lora_A.weight``; diffusers ``src/diffusers/loaders/lora_pipeline.py``), which stock
  ``load_lora_weights`` loads with every module adapted. alpha / r is folded into ``lora_B``: loaders
  assume alpha = r for peft files without metadata, so the file means the same to every tool.
- ``pytorch_lora_weights_kohya.safetensors`` for A1111 / ComfyUI: ``lora_unet_*`` and the text encoders'
  ``lora_te_*`` (SDXL ``lora_te1_*`` / ``lora_te2_*``) with ``.lora_down`` / ``.lora_up`` / a 0-d
  ``.alpha``, the names diffusers' ``_convert_non_diffusers_lora_to_diffusers``
  (``src/diffusers/loaders/lora_conversion_utils.py``) reads back. SD1.x/2.x UNet modules keep their
  diffusers paths with dots as underscores (kohya sd-scripts' SD1 UNet uses diffusers names); SDXL UNet
  modules get their original-SD (SAI / sgm) names (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
  ``output_blocks_2_2_conv``): sd-scripts' SDXL UNet has only those, ComfyUI and A1111 map them, and
  diffusers' SDXL ``load_lora_weights`` maps them back with the UNet config
  (``_maybe_map_sgm_blocks_to_diffusers``). ``original_sd_name`` is the inverse of diffusers' single-file
  conversion ``convert_ldm_unet_checkpoint`` (``src/diffusers/loaders/single_file_utils.py``). FLUX's copy is
  in the original (BFL) layout with fused projections instead (``ldmkit.lora.flux_layout``), SD3's in SAI's
  MMDiT layout (``ldmkit.lora.sd3_layout``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmkit.errors import UserError
from ldmkit.lora.layers import (  # noqa: F401  (re-exported: ldmkit.lora.export is where callers look)
    COMPONENTS,
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    Layers,
    LoraLayer,
)

log = logging.getLogger(__name__)


def layers_from_peft_model(model: torch.nn.Module, adapter_name: str = "default") -> Layers:
    """The LoRA of a live peft-adapted model, with each module's effective scale (rank/alpha patterns, rsLoRA).

    peft keeps ``scaling[adapter] = lora_alpha / r`` per layer, so alpha = scaling * r reproduces it.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    layers: Layers = {}
    for name, module in model.named_modules():
        if isinstance(module, PeftLoraLayer) and adapter_name in module.lora_A:
            down = module.lora_A[adapter_name].weight.detach()
            up = module.lora_B[adapter_name].weight.detach()
            layers[name] = LoraLayer(down=down, up=up, alpha=module.scaling[adapter_name] * down.shape[0])
    return layers


def peft_state_dict(layers: Layers) -> dict[str, torch.Tensor]:
    """``<module>.lora_A.weight`` / ``.lora_B.weight`` (what ``get_peft_model_state_dict`` gives), alpha / r
    folded into ``lora_B``; fp32 on the CPU."""
    out = {}
    for module, layer in layers.items():
        out[f"{module}.lora_A.weight"] = layer.down.detach().float().cpu().contiguous()
        out[f"{module}.lora_B.weight"] = layer.folded_up().detach().float().cpu().contiguous()
    return out


def kohya_prefix(component: str, sdxl: bool) -> str:
    """``lora_unet_``, ``lora_te_`` (SD) / ``lora_te1_`` and ``lora_te2_`` (SDXL)."""
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if sdxl else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise UserError(f"no kohya name for LoRA component {component!r}")


SDXL_UNET_LAYOUT = {
    "layers_per_block": 2,
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
"""The block layout of every SDXL UNet (SDXL base, refiner-free fine-tunes): what the original-SD names
depend on. Used when no UNet config is at hand."""

# diffusers -> original-SD names outside the blocks (diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"] in
# src/diffusers/loaders/single_file_utils.py) and inside a resnet (its update_unet_resnet_ldm_to_diffusers).
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _layers_per_block(unet_config: Mapping) -> int:
    n = unet_config["layers_per_block"]
    if isinstance(n, (list, tuple)):
        if len(set(n)) != 1:
            raise UserError(f"no original-SD block names for a UNet with layers_per_block {list(n)}")
        n = n[0]
    return int(n)


def original_sd_name(path: str, unet_config: Mapping | None = None) -> str:
    """The original-SD (sgm) name of a diffusers UNet module or parameter path, given the UNet's config
    (``layers_per_block``, ``up_block_types``; default: SDXL's layout). Input block k counts conv_in as 0
    and then ``layers_per_block`` resnets (+ attention at ``.1``) and one downsampler per down block;
    output blocks have ``layers_per_block + 1`` resnets each, the upsampler sits after the last one's
    attention (``.2``) or resnet (``.1``)."""
    cfg = SDXL_UNET_LAYOUT if unet_config is None else unet_config
    for diffusers, original in _UNET_TOP.items():
        if path == diffusers or path.startswith(diffusers + "."):
            return original + path[len(diffusers) :]
    parts = path.split(".")
    try:
        if parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            block = f"middle_block.{2 * j if kind == 'resnets' else 1}"
        else:
            n = _layers_per_block(cfg) + 1
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                if kind == "downsamplers":  # conv -> op
                    block, rest = f"input_blocks.{n * (i + 1)}.0", ["op" if r == "conv" else r for r in rest]
                else:
                    block = f"input_blocks.{n * i + j + 1}.{0 if kind == 'resnets' else 1}"
            elif parts[0] == "up_blocks":
                if kind == "upsamplers":
                    inner = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
                    block = f"output_blocks.{n * i + n - 1}.{inner}"
                else:
                    block = f"output_blocks.{n * i + j}.{0 if kind == 'resnets' else 1}"
            else:
                raise ValueError(parts[0])
        if kind not in ("resnets", "attentions", "downsamplers", "upsamplers"):
            raise ValueError(kind)
    except (ValueError, IndexError, KeyError):
        raise UserError(f"no original-SD name for the UNet module {path}") from None
    if kind == "resnets" and rest:
        rest = [_RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([block, *rest])


def kohya_name(component: str, module: str, sdxl: bool, unet_config: Mapping | None = None) -> str:
    """The kohya module name: prefix + the module path with dots as underscores. SDXL UNet modules are
    named by their original-SD path (``original_sd_name``, laid out by ``unet_config``; default SDXL's),
    SD1.x/2.x UNet modules by their diffusers path, text encoders by their transformers path, as kohya
    writes them."""
    if component == "unet" and sdxl:
        module = original_sd_name(module, unet_config)
    elif component in ("text_encoder", "text_encoder_2"):
        module = clip_text_model_path(module)
    return kohya_prefix(component, sdxl) + module.replace(".", "_")


_CLIP_INNER = ("encoder.", "embeddings.", "final_layer_norm")


def clip_text_model_path(module: str) -> str:
    """A CLIP text-encoder module's path under ``text_model.``, as kohya's files name it
    (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``: what A1111's ``networks.py``, ComfyUI's
    ``model_lora_keys_clip`` and sd-scripts map). transformers 5's CLIPTextModel has no ``text_model``
    wrapper in its module paths (``encoder.layers.0...``), so the name is put back; diffusers strips it again
    when it loads such a file into an encoder without the wrapper (``lora_base.py``)."""
    return "text_model." + module if module.startswith(_CLIP_INNER) else module


def kohya_state_dict(
    components: Mapping[str, Layers], sdxl: bool, unet_config: Mapping | None = None
) -> dict[str, torch.Tensor]:
    """kohya keys ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-d fp32), fp32 weights;
    ``unet_config`` lays out SDXL's original-SD names (see ``kohya_name``)."""
    out = {}
    for component, layers in components.items():
        for module, layer in layers.items():
            key = kohya_name(component, module, sdxl, unet_config)
            out[f"{key}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    return out


def is_sdxl_pipeline(pipeline_cls: type) -> bool:
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    return issubclass(pipeline_cls, StableDiffusionXLLoraLoaderMixin)


def denoiser_component(pipeline_cls: type, component: str) -> str:
    """The name a pipeline gives the denoiser's LoRA layers: methods call the denoiser "unet" whatever it is;
    SD3 / FLUX pipelines save and load it as "transformer" (their ``save_lora_weights`` takes
    ``transformer_lora_layers``)."""
    import inspect

    if component != "unet":
        return component
    accepted = inspect.signature(pipeline_cls.save_lora_weights).parameters
    return "unet" if "unet_lora_layers" in accepted or "transformer_lora_layers" not in accepted else "transformer"


def save_diffusers(path: str | Path, components: Mapping[str, Layers], pipeline_cls: type) -> Path:
    """The diffusers file at ``path`` (a ``.safetensors`` file, or a folder that gets
    pytorch_lora_weights.safetensors), written by ``pipeline_cls.save_lora_weights``."""
    p = Path(path)
    folder, name = (p.parent, p.name) if p.suffix == ".safetensors" else (p, LORA_WEIGHT_NAME)
    layers = {
        f"{denoiser_component(pipeline_cls, c)}_lora_layers": peft_state_dict(ls) for c, ls in components.items() if ls
    }
    if not layers:
        raise UserError("the LoRA has no adapted modules")
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(folder, weight_name=name, **layers)
    return folder / name


def save_kohya(
    path: str | Path, components: Mapping[str, Layers], sdxl: bool, unet_config: Mapping | None = None
) -> Path:
    """The kohya file at ``path`` (a ``.safetensors`` file, or a folder that gets
    pytorch_lora_weights_kohya.safetensors); ``unet_config``: see ``kohya_name``."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / KOHYA_WEIGHT_NAME
    tensors = kohya_state_dict(components, sdxl, unet_config)
    if not tensors:
        raise UserError("the LoRA has no adapted modules")
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p


def is_flux_pipeline(pipeline_cls: type) -> bool:
    from diffusers.loaders import FluxLoraLoaderMixin

    return issubclass(pipeline_cls, FluxLoraLoaderMixin)


def save_kohya_copy(
    out_dir: str | Path, components: Mapping[str, Layers], pipeline_cls: type, denoiser: torch.nn.Module | None
) -> Path:
    """The copy for the other clients, in the layout of the pipeline's model: FLUX's original (BFL) names with
    fused projections (``ldmkit.lora.flux_layout``, laid out by the transformer's config), SD3's original (SAI
    MMDiT) names likewise (``ldmkit.lora.sd3_layout``), else kohya's SD / SDXL names (``save_kohya``, SDXL's laid out by the UNet's config)."""
    from diffusers.loaders import SD3LoraLoaderMixin

    config = getattr(getattr(denoiser, "module", denoiser), "config", None)
    if is_flux_pipeline(pipeline_cls) or issubclass(pipeline_cls, SD3LoraLoaderMixin):
        from ldmkit.lora import flux_layout, sd3_layout

        if config is None:
            raise UserError("the original layout of a transformer's LoRA needs the transformer's config")
        layout = flux_layout if is_flux_pipeline(pipeline_cls) else sd3_layout
        return layout.save_kohya(out_dir, components, config)
    return save_kohya(out_dir, components, is_sdxl_pipeline(pipeline_cls), config)


def export_lora(
    out_dir: str | Path, models: Mapping[str, torch.nn.Module], pipeline_cls: type, kohya: bool = True
) -> int:
    """Write the LoRA adapters of live peft-adapted ``models`` (``{component: model}``) to ``out_dir``: the
    diffusers file and, with ``kohya``, the copy for the other clients (``save_kohya_copy``: A1111 / ComfyUI know
    SD / SDXL UNets, not the U-ViT; ComfyUI / sd-scripts / Forge the BFL layout of FLUX). Returns the number of adapted modules."""
    out_dir = Path(out_dir)
    components = {name: layers_from_peft_model(model) for name, model in models.items()}
    save_diffusers(out_dir, components, pipeline_cls)
    if kohya:
        save_kohya_copy(out_dir, components, pipeline_cls, models.get("unet", models.get("transformer")))
    n = sum(len(layers) for layers in components.values())
    log.info("exported LoRA (%d modules) to %s", n, out_dir)
    return n
