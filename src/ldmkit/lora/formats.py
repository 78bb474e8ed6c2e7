"""Reading LoRA files into ``{component: {module path: LoraLayer}}`` (``ldmkit.lora.export``'s form).

SD / SDXL files go through diffusers' own reader, ``StableDiffusionPipeline.lora_state_dict``
(``src/diffusers/loaders/lora_pipeline.py``): it converts kohya files (``lora_unet_*``, the text encoders'
``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*``, DoRA ``dora_scale`` dropped as ``load_lora_weights`` does,
PaddleMIX's ``lcm_lora.safetensors`` with its 0-d alphas) and, given the UNet config, SDXL files with
original-SD block names (``input_blocks_*``, ``middle_block_*``, ``output_blocks_*``). Each key is then
put in peft form with diffusers' key maps (``convert_unet_state_dict_to_peft`` /
``convert_state_dict_to_peft``, ``src/diffusers/utils/state_dict_utils.py``) one key at a time, so files
that mix layouts (what ``convert_state_dict_to_diffusers`` writes; ``load_lora_adapter`` converts by the
first key only and silently skips the rest) are read whole.

What diffusers lacks, and so ldmkit keeps:
- the ``base_model.model.`` prefix of a PeftModel's keys (the reference LCM-LoRA script) and peft adapter
  names (``lora_A.default.weight``), which ``load_lora_weights`` rejects;
- keys without a component prefix (``down_blocks...lora_A.weight``), read as the denoiser's;
- kohya files of ldmkit's U-ViT: ``lora_unet_<path with underscores>`` resolved against the U-ViT's own
  module names (diffusers' converter knows only UNet names);
- FLUX files in the original (BFL) layout for transformers of other widths than FLUX.1's (``read_flux_kohya``),
  and SD3 files in SAI's MMDiT layout (``lora_unet_joint_blocks_*``), which diffusers does not read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldmkit.errors import UserError
from ldmkit.lora import flux_layout, sd3_layout
from ldmkit.lora.export import COMPONENTS, LORA_WEIGHT_NAME, Layers, LoraLayer

logger = logging.getLogger(__name__)

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")


def load_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA ``.safetensors`` file, or of the one LoRA file inside a folder."""
    p = Path(path)
    if p.is_dir():
        if (p / LORA_WEIGHT_NAME).is_file():
            p = p / LORA_WEIGHT_NAME
        else:
            files = sorted(p.glob("*.safetensors"))
            if len(files) != 1:
                raise UserError(f"expected {LORA_WEIGHT_NAME} (or exactly one .safetensors file) in {path}")
            p = files[0]
    if not p.is_file():
        raise UserError(f"LoRA file not found: {path}")
    if p.suffix != ".safetensors":
        raise UserError(f"LoRA file must be .safetensors (pickle files are not loaded): {p}")
    return read_safetensors(p, "LoRA file")


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``; an empty, truncated or foreign file is one UserError naming it (safetensors
    raises a SafetensorError or an OSError with a message about the header, which says nothing of the file)."""
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes)")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors_rust.SafetensorError, OSError, ...: all mean "not a readable file"
        raise UserError(f"{what} {path} is not a readable safetensors file ({size} bytes): {e}") from None
    if not state:
        raise UserError(f"{what} {path} holds no tensors")
    return state


def is_kohya(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Every key kohya's (the test diffusers' ``lora_state_dict`` applies)."""
    return bool(state_dict) and all(k.startswith(_KOHYA_PREFIXES) for k in state_dict)


def uvit_module_names(state_dict: Mapping[str, torch.Tensor]) -> list[str] | None:
    """Module names of a U-ViT deep enough for the block indices in ``state_dict``'s kohya keys (built on
    the meta device from models/uvit.py, so no name list is kept here), or None when no key names a U-ViT
    block."""
    from accelerate import init_empty_weights

    from ldmkit.models.uvit import UViT

    flats = [k[len("lora_unet_") :].partition(".")[0] for k in state_dict if k.startswith("lora_unet_")]
    if not any(f.startswith(("in_blocks_", "out_blocks_", "mid_block_attn_", "mid_block_mlp_")) for f in flats):
        return None
    blocks = [int(m[1]) for f in flats if (m := re.match(r"(?:in|out)_blocks_(\d+)_", f))]
    with init_empty_weights():
        uvit = UViT(
            sample_size=2, patch_size=1, embed_dim=2, depth=2 * (max(blocks, default=0) + 1), num_heads=1,
            context_dim=1, num_text_tokens=1, time_cond_proj_dim=1,
        )  # fmt: skip
    return [n for n, _ in uvit.named_modules()]


def _uvit_kohya(state_dict: Mapping[str, torch.Tensor], module_names: Iterable[str]):
    """``lora_unet_*`` keys resolved against U-ViT module names -> (peft-keyed dict, alphas), or None when a
    name is not the U-ViT's (then the file is a UNet's)."""
    exact = {n.replace(".", "_"): n for n in module_names if n}
    out, alphas = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("lora_unet_"):
            out[key] = value
            continue
        flat, _, suffix = key[len("lora_unet_") :].partition(".")
        if flat not in exact:
            return None
        module = f"unet.{exact[flat]}"
        if suffix == "lora_down.weight":
            out[f"{module}.lora_A.weight"] = value
        elif suffix == "lora_up.weight":
            out[f"{module}.lora_B.weight"] = value
        elif suffix == "alpha":
            alphas[f"{module}.alpha"] = float(value.float().reshape(-1)[0])
        else:
            raise UserError(f"unrecognised kohya LoRA key: {key}")
    return out, alphas


def _split_component(key: str) -> tuple[str, str]:
    for component in sorted(COMPONENTS, key=len, reverse=True):
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :]
    return "unet", key  # no prefix: the denoiser's (old diffusers / bare peft keys)


def _peft_key(component: str, key: str) -> str:
    """One key in peft form (``<module>.lora_A.weight``) through diffusers' key maps."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if ".lora_A." not in key and ".lora_B." not in key:
        if component != "unet" and "lora_linear_layer" in key:
            key = next(iter(convert_state_dict_to_peft({key: None}, StateDictType.DIFFUSERS)))
        elif component != "unet" and re.search(r"\.to_(q|k|v|out)_lora\.", key):  # text-encoder attention
            key = next(iter(convert_state_dict_to_peft({key: None}, StateDictType.DIFFUSERS_OLD)))
        else:  # UNet keys, and the generic lora.down / lora.up
            key = next(iter(convert_unet_state_dict_to_peft({key: None})))
    return key.replace(".processor.", ".")  # attention-processor keys name the attention's projections


def read_lora(
    state_dict: Mapping[str, torch.Tensor], unet_config=None, uvit_names: Iterable[str] | None = None
) -> dict[str, Layers]:
    """Any supported file -> ``{component: {module path: LoraLayer}}``.

    ``unet_config`` (the UNet's config) lets original-SD block names resolve, as SDXL's
    ``load_lora_weights`` does; ``uvit_names`` (a U-ViT's ``named_modules()`` names) resolves U-ViT kohya
    names against the model at hand (without it, against a U-ViT of the file's depth).
    """
    from diffusers import StableDiffusionPipeline

    if not state_dict:
        raise UserError("the LoRA file holds no tensors")
    # ldmkit's extra layouts: a PeftModel's prefix and peft adapter names.
    sd = {_ADAPTER_NAME.sub(r".\1.weight", k.replace("base_model.model.", "")): v for k, v in state_dict.items()}
    dora = next((k for k in sd if "lora_magnitude_vector" in k), None)
    if dora:
        raise UserError(f"DoRA LoRAs in peft layout are not supported here (load them with generate --lora): {dora}")
    alphas: dict[str, float] = {}
    if any(k.startswith("lora_unet_") for k in sd) and unet_config is None:
        names = uvit_module_names(sd) if uvit_names is None else list(uvit_names)
        uvit = _uvit_kohya(sd, names) if names else None
        if uvit is not None:
            sd, alphas = uvit
    if is_kohya(sd):
        if unet_config is None and any(k.startswith("lora_unet_" + b) for k in sd for b in _SGM_BLOCKS):
            raise UserError(
                "this kohya LoRA uses original SD block names (input_blocks_*, ...): give the model it is for "
                "(--model) so they map to the UNet's blocks"
            )
        try:
            sd, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(sd), unet_config=unet_config)
        except (ValueError, KeyError, IndexError) as e:
            raise UserError(f"kohya LoRA not readable by diffusers: {str(e).strip().splitlines()[-1]}") from None
        alphas.update(network_alphas or {})
    elif any(k.startswith(_KOHYA_PREFIXES) for k in sd):
        first = next(k for k in sd if k.startswith(_KOHYA_PREFIXES))
        raise UserError(f"the LoRA file mixes kohya keys ({first}) with other keys")

    downs: dict[tuple[str, str], torch.Tensor] = {}
    ups: dict[tuple[str, str], torch.Tensor] = {}
    scales: dict[tuple[str, str], float] = {}
    for key, value in sd.items():
        component, rest = _split_component(key)
        if rest.endswith(".alpha"):  # network alphas of the old diffusers layout
            alphas[key] = float(value.float().reshape(-1)[0])
            continue
        m = _PEFT_KEY.match(_peft_key(component, rest))
        if not m:
            raise UserError(f"unrecognised LoRA key: {key}")
        (downs if m["kind"] == "A" else ups)[(component, m["module"])] = value
    for key, alpha in alphas.items():
        component, rest = _split_component(key)
        rest = rest.removesuffix(".alpha")
        if rest.endswith(".weight"):  # diffusers names kohya attention alphas after their down weight
            m = _PEFT_KEY.match(_peft_key(component, rest))
            rest = m["module"] if m else rest
        scales[(component, rest.replace(".processor.", "."))] = alpha

    out: dict[str, Layers] = {}
    for component, module in sorted(set(downs) | set(ups)):
        if (component, module) not in downs or (component, module) not in ups:
            raise UserError(f"LoRA module {component}.{module} has only one of its down/up weights")
        down, up = downs[(component, module)], ups[(component, module)]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise UserError(
                f"LoRA module {component}.{module}: up {tuple(up.shape)} does not fit down {tuple(down.shape)}"
            )
        out.setdefault(component, {})[module] = LoraLayer(down, up, scales.get((component, module)))
    if not out:
        raise UserError("no LoRA weights found in the file")
    return out


def peft_state_dict(components: Mapping[str, Layers]) -> dict[str, torch.Tensor]:
    """``<component>.<module>.lora_A/B.weight`` with alpha / r folded in: what ``load_lora_weights`` takes."""
    from ldmkit.lora.export import peft_state_dict as component_state_dict

    return {f"{c}.{k}": v for c, layers in components.items() for k, v in component_state_dict(layers).items()}


def check_modules(components: Mapping[str, Layers], component: str, module_names: Iterable[str]) -> None:
    """UserError naming the first LoRA module of ``component`` that the model lacks. A module matches a
    model name equal to it or ending in ``.<module>``, as peft matches target modules (text-encoder paths
    lose their ``text_model.`` in diffusers' kohya conversion with some transformers versions)."""
    names = set(module_names)
    suffixes = {n.split(".", i)[-1] for n in names for i in range(1, n.count(".") + 1)}
    missing = sorted(m for m in components.get(component, {}) if m not in names and m not in suffixes)
    if missing:
        raise UserError(f"LoRA module {component}.{missing[0]} is not in the model ({len(missing)} missing)")


def read_flux_kohya(pipe, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Layers]:
    """A FLUX LoRA in the original (BFL) layout of kohya sd-scripts / ComfyUI (``lora_unet_double_blocks_*``,
    fused qkv and ``linear1``) read for ``pipe``'s transformer. At FLUX.1's widths through diffusers' own
    converter (``FluxPipeline.lora_state_dict``, ``_convert_kohya_flux_lora_to_diffusers``), which also knows
    the other FLUX layouts people share; at other widths (the tiny twins), which that converter rejects (it
    splits ``linear1`` at FLUX.1's fixed sizes), through ``ldmkit.lora.flux_layout.read_kohya`` by the
    transformer's config. Text-encoder keys (``lora_te1_``) resolve against the pipeline's encoder."""
    config = pipe.transformer.config
    if flux_layout.widths(config) == flux_layout.FLUX1_WIDTHS:
        try:
            converted = type(pipe).lora_state_dict(dict(state_dict))
        except (ValueError, KeyError, AssertionError) as e:
            raise UserError(f"FLUX kohya LoRA not readable by diffusers: {str(e).strip().splitlines()[-1]}") from None
        components = read_lora(converted[0] if isinstance(converted, tuple) else converted)
        if "unet" in components:  # the converter leaves the BFL top-level modules (final_layer, ...) unprefixed
            components.setdefault("transformer", {}).update(components.pop("unet"))
        return components
    return _resolve_text_encoders(pipe, flux_layout.read_kohya(state_dict, config), flux_layout.TEXT_ENCODER_PREFIXES)


def _resolve_text_encoders(pipe, components: dict[str, Layers], prefixes: Mapping[str, str]) -> dict[str, Layers]:
    """Text-encoder modules of a kohya file (flat names, dots as underscores) resolved against the pipeline's
    encoders' module names."""
    for component, prefix in prefixes.items():
        if component not in components:
            continue
        model = getattr(pipe, component, None)
        names = [n for n, _ in model.named_modules() if n] if model is not None else []
        exact = {flux_layout.clip_path(n, prefix).replace(".", "_"): n for n in names}
        exact.update({n.replace(".", "_"): n for n in names})
        missing = sorted(m for m in components[component] if m not in exact)
        if missing:
            raise UserError(f"LoRA module {prefix}{missing[0]} is not in the pipeline's {component}")
        components[component] = {exact[m]: layer for m, layer in components[component].items()}
    return components


def read_for_pipeline(pipe, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The LoRA in ``state_dict`` read for ``pipe`` (its UNet's config resolves original-SD names, a U-ViT's
    module names its kohya keys), every module checked against the pipeline's: a LoRA of another model is
    one UserError naming the modules it does not find."""
    from ldmkit.models.uvit import UViT

    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", {})
    if unet is None and "num_single_layers" in config and flux_layout.is_bfl_kohya(state_dict):
        components = read_flux_kohya(pipe, state_dict)
    elif unet is None and "dual_attention_layers" in config and sd3_layout.is_sai_kohya(state_dict):
        components = _resolve_text_encoders(
            pipe, sd3_layout.read_kohya(state_dict, config), sd3_layout.TEXT_ENCODER_PREFIXES
        )
    elif unet is None:  # SD3 / FLUX: a transformer, whose LoRA keys name it (no original-SD or U-ViT kohya names)
        components = read_lora(state_dict)
        if "unet" in components:  # bare keys: the denoiser's
            components["transformer"] = components.pop("unet")
    else:
        is_uvit = isinstance(unet, UViT)
        unet_names = [n for n, _ in unet.named_modules()]
        components = read_lora(
            state_dict, unet_config=None if is_uvit else unet.config, uvit_names=unet_names if is_uvit else None
        )
    for name in components:
        model = getattr(pipe, name, None)
        if model is None:
            raise UserError(f"the LoRA adapts {name}, which {type(pipe).__name__} does not have")
        if name.startswith("text_encoder") and not hasattr(model, "text_model"):
            # kohya files name CLIP modules under text_model. (export.clip_text_model_path); transformers 5's
            # CLIPTextModel has no such wrapper, so the prefix goes, as diffusers' lora_base.py drops it
            components[name] = {m.removeprefix("text_model."): layer for m, layer in components[name].items()}
        check_modules(components, name, (n for n, _ in model.named_modules()))
        components[name] = fit_module_shapes(components[name], model, name)
    return components


def fit_module_shapes(layers: Layers, model: torch.nn.Module, component: str) -> Layers:
    """``layers`` shaped like the modules they adapt. A 1x1 convolution and a linear layer are the same map,
    and LoRAs meet both for one module (SD1.x's conv ``proj_in`` / ``proj_out`` against SD2.x's linear
    ones, files written by tools that flatten 1x1 kernels): the factors are reshaped, exactly. A LoRA whose
    sizes are not the module's is one UserError naming it (peft's load would end in a size-mismatch
    traceback)."""
    modules = dict(model.named_modules())
    out = {}
    for path, layer in layers.items():
        module = modules.get(path) or next(m for n, m in modules.items() if n.endswith("." + path))
        weight = getattr(module, "weight", None)
        down, up = layer.down, layer.up
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and down.ndim == 2 == up.ndim:
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif isinstance(module, torch.nn.Linear) and down.ndim == 4 == up.ndim and down.shape[2:] == (1, 1):
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        if weight is not None and (up.shape[0], down.shape[1]) != tuple(weight.shape[:2]):
            raise UserError(
                f"LoRA module {component}.{path} maps {down.shape[1]} -> {up.shape[0]} features, the model's "
                f"{type(module).__name__} {weight.shape[1]} -> {weight.shape[0]}: the LoRA is for another model"
            )
        out[path] = LoraLayer(down, up, layer.alpha) if down is not layer.down else layer
    return out
