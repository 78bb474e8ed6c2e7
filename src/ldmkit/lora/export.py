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
  (``src/diffusers/loaders/lora_conversion_utils.py``) reads back. The UNet's module names are its
  diffusers paths with dots as underscores (``kohya_name``: the one place to switch SDXL to original-SD
  block names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmkit.errors import UserError

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name: what ``pipe.load_lora_weights(dir)`` looks for."""
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
"""The kohya-format copy written next to it."""

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""Pipeline components a LoRA may adapt, in the order of the pipelines' ``_lora_loadable_modules``."""


@dataclass
class LoraLayer:
    """One adapted module: ``W += (alpha / rank) * up @ down``; alpha None means alpha = rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def folded_up(self) -> torch.Tensor:
        """``scale * up``: the same update with alpha = rank."""
        return self.up if self.scale == 1.0 else (self.up.float() * self.scale).to(self.up.dtype)


Layers = dict[str, LoraLayer]
"""``{module path inside one component: LoraLayer}``."""


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


def kohya_name(component: str, module: str, sdxl: bool) -> str:
    """The kohya module name: prefix + the module path with dots as underscores (diffusers' UNet names
    for SD and SDXL alike; text encoders: the transformers paths, as kohya writes them)."""
    return kohya_prefix(component, sdxl) + module.replace(".", "_")


def kohya_state_dict(components: Mapping[str, Layers], sdxl: bool) -> dict[str, torch.Tensor]:
    """kohya keys ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-d fp32), fp32 weights."""
    out = {}
    for component, layers in components.items():
        for module, layer in layers.items():
            key = kohya_name(component, module, sdxl)
            out[f"{key}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    return out


def is_sdxl_pipeline(pipeline_cls: type) -> bool:
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    return issubclass(pipeline_cls, StableDiffusionXLLoraLoaderMixin)


def save_diffusers(path: str | Path, components: Mapping[str, Layers], pipeline_cls: type) -> Path:
    """The diffusers file at ``path`` (a ``.safetensors`` file, or a folder that gets
    pytorch_lora_weights.safetensors), written by ``pipeline_cls.save_lora_weights``."""
    p = Path(path)
    folder, name = (p.parent, p.name) if p.suffix == ".safetensors" else (p, LORA_WEIGHT_NAME)
    layers = {f"{c}_lora_layers": peft_state_dict(ls) for c, ls in components.items() if ls}
    if not layers:
        raise UserError("the LoRA has no adapted modules")
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(folder, weight_name=name, **layers)
    return folder / name


def save_kohya(path: str | Path, components: Mapping[str, Layers], sdxl: bool) -> Path:
    """The kohya file at ``path`` (a ``.safetensors`` file, or a folder that gets
    pytorch_lora_weights_kohya.safetensors)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / KOHYA_WEIGHT_NAME
    tensors = kohya_state_dict(components, sdxl)
    if not tensors:
        raise UserError("the LoRA has no adapted modules")
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p


def export_lora(
    out_dir: str | Path, models: Mapping[str, torch.nn.Module], pipeline_cls: type, kohya: bool = True
) -> int:
    """Write the LoRA adapters of live peft-adapted ``models`` (``{component: model}``) to ``out_dir``: the
    diffusers file and, with ``kohya``, the kohya copy (A1111 / ComfyUI know SD / SDXL UNets, not the
    U-ViT). Returns the number of adapted modules."""
    out_dir = Path(out_dir)
    components = {name: layers_from_peft_model(model) for name, model in models.items()}
    save_diffusers(out_dir, components, pipeline_cls)
    if kohya:
        save_kohya(out_dir, components, is_sdxl_pipeline(pipeline_cls))
    n = sum(len(layers) for layers in components.values())
    log.info("exported LoRA (%d modules) to %s", n, out_dir)
    return n
