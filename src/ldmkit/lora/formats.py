"""UNet LoRA files: read any common layout, write diffusers (peft) and kohya, merge into a UNet.

Everything goes through one neutral form, ``{module path: LoraLayer(down, up, alpha)}``, where the
module path is the diffusers UNet attribute path (``down_blocks.0.attentions.0.proj_in``), ``down`` is
peft's ``lora_A`` / kohya's ``lora_down`` ([r, in] or [r, in, kh, kw]) and ``up`` is ``lora_B`` /
``lora_up`` ([out, r] or [out, r, 1, 1]). The weight update is ``W += (alpha / r) * up @ down``.

Layouts read (REFERENCE.md section 1, "LoRA file formats"):
- peft / diffusers: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` as written by
  ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=get_peft_model_state_dict(unet))``;
  also the ``base_model.model.`` prefix of the reference LCM-LoRA script (which ``load_lora_weights``
  rejects), peft adapter names (``lora_A.default.weight``), old diffusers ``lora.down`` / ``lora.up`` and
  attention-processor keys (``attn1.processor.to_q_lora.down.weight``), and files that mix them (what
  ``convert_state_dict_to_diffusers`` writes, of which ``load_lora_weights`` silently skips a part).
- kohya (A1111 / ComfyUI / PaddleMIX ``lcm_lora.safetensors``): ``lora_unet_<path with dots as
  underscores>.lora_down.weight`` / ``.lora_up.weight`` / scalar ``.alpha`` (PaddleMIX writes a 0-d alpha,
  lora_alpha 8 for rank 64: scale 0.125).

Layouts written: diffusers/peft keys (``unet.<module>.lora_A.weight``; alpha / r is folded into
``lora_B`` so that any loader, which assumes alpha = r for peft files without metadata, gets the same
update) and kohya keys with an explicit ``.alpha``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldmkit.errors import UserError

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name: what ``pipe.load_lora_weights(dir)`` looks for."""
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
"""The kohya-format copy written next to it."""

KOHYA_PREFIX = "lora_unet_"

# Attribute names of diffusers UNets (and ldmkit's U-ViT) that contain underscores: kohya keys turn every dot into an
# underscore, so without the model at hand these are re-joined greedily (longest first).
_COMPOUND_NAMES = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2",
    "conv_in", "conv_out", "conv_norm_out", "add_embedding", "cond_proj", "time_proj", "class_embedding",
    "encoder_hid_proj", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_out",
    # ldmkit's U-ViT (models/uvit.py)
    "in_blocks", "out_blocks", "skip_linear", "patch_embed", "context_embed", "decoder_pred", "final_layer",
}  # fmt: skip
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")

# Suffixes of the peft / diffusers layouts; an optional peft adapter name may sit before ``.weight``.
_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(?:\.(?P<adapter>[^.]+))?\.weight$"
)
# Old diffusers attention-processor keys: ``attn1.processor.to_q_lora.down.weight``.
_PROCESSOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$")


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

    def delta(self) -> torch.Tensor:
        """The weight update ``scale * up @ down`` in fp32, shaped like the base weight.

        Linear: [out, r] @ [r, in]. Conv: ``up`` is 1x1, so composing conv(down) then conv(up) is the
        kxk kernel sum_r up[o, r] * down[r, i, :, :] (covers 1x1 convs too).
        """
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2:
            return self.scale * (up @ down)  # (out, in)
        if up.shape[2:] != (1, 1):
            raise UserError(f"LoRA conv 'up' kernels must be 1x1, got {tuple(up.shape)}")
        return self.scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # (out, in, kh, kw)


Layers = dict[str, LoraLayer]


# ---------------------------------------------------------------------------------------------- reading
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
    return load_file(str(p))


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'kohya' when every key is ``lora_unet_*``/``lora_te*``, else 'diffusers' (peft or older diffusers keys)."""
    if not state_dict:
        raise UserError("the LoRA file holds no tensors")
    if all(k.startswith(("lora_unet_", "lora_te")) for k in state_dict):
        return "kohya"
    return "diffusers"


def _check_unet_key(key: str) -> None:
    if key.startswith(("text_encoder", "lora_te")):
        raise UserError(f"text-encoder LoRA keys are not supported (only UNet LoRAs): {key}")
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        raise UserError(f"DoRA LoRAs are not supported: {key}")


def _kohya_name_resolver(module_names: Iterable[str] | None):
    """Map a kohya module name (dots as underscores) back to a module path.

    With the model's module names this is exact; without, known compound attribute names are re-joined.
    """
    exact = {}
    if module_names is not None:
        for n in module_names:
            exact.setdefault(n.replace(".", "_"), n)

    def resolve(flat: str) -> str:
        if flat in exact:
            return exact[flat]
        if flat.startswith(_SGM_BLOCKS):
            raise UserError(
                f"kohya key uses original SD (sgm) block names ({flat}); only diffusers module names are "
                "supported here (load such files with diffusers' load_lora_weights)"
            )
        parts, tokens, i = [], flat.split("_"), 0
        while i < len(tokens):
            for n in (3, 2, 1):
                name = "_".join(tokens[i : i + n])
                if n == 1 or name in _COMPOUND_NAMES:
                    parts.append(name)
                    i += n
                    break
        path = ".".join(parts)
        if module_names is not None and exact:
            raise UserError(f"LoRA module {path} (kohya name {flat}) is not in the model")
        return path

    return resolve


def read_lora(state_dict: Mapping[str, torch.Tensor], module_names: Iterable[str] | None = None) -> Layers:
    """Any supported layout -> ``{module path: LoraLayer}``.

    ``module_names`` (the UNet's ``named_modules()`` names) makes kohya names resolve exactly and is
    recommended whenever the model is at hand.
    """
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    fmt = detect_format(state_dict)
    if fmt == "kohya":
        resolve = _kohya_name_resolver(module_names)
        for key, value in state_dict.items():
            _check_unet_key(key)
            flat, _, suffix = key[len(KOHYA_PREFIX) :].partition(".")
            if suffix == "lora_down.weight":
                downs[resolve(flat)] = value
            elif suffix == "lora_up.weight":
                ups[resolve(flat)] = value
            elif suffix == "alpha":
                alphas[resolve(flat)] = float(value.float().reshape(-1)[0])
            else:
                raise UserError(f"unrecognised kohya LoRA key: {key}")
    else:
        for key, value in state_dict.items():
            _check_unet_key(key)
            k = key.removeprefix("unet.").removeprefix("base_model.model.").replace(".processor.", ".")
            if k.endswith(".alpha"):  # network alphas of the old diffusers layout
                alphas[k.removesuffix(".alpha")] = float(value.float().reshape(-1)[0])
                continue
            m = _PROCESSOR_KEY.match(k)
            if m:
                proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
                module, is_down = f"{m['module']}.{proj}", m["kind"] == "down"
            else:
                m = _PEFT_KEY.match(k)
                if not m:
                    raise UserError(f"unrecognised LoRA key: {key}")
                module, is_down = m["module"], m["kind"] in ("lora_A", "lora.down", "lora_linear_layer.down")
            (downs if is_down else ups)[module] = value

    layers: Layers = {}
    for module in sorted(set(downs) | set(ups)):
        if module not in downs or module not in ups:
            raise UserError(f"LoRA module {module} has only one of its down/up weights")
        down, up = downs[module], ups[module]
        if up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA module {module}: up {tuple(up.shape)} does not fit down {tuple(down.shape)}")
        layers[module] = LoraLayer(down=down, up=up, alpha=alphas.get(module))
    if not layers:
        raise UserError("no UNet LoRA weights found in the file")
    return layers


def layers_from_peft_model(unet: torch.nn.Module, adapter_name: str = "default") -> Layers:
    """The LoRA of a live peft-adapted model, with each module's effective scale (rank/alpha patterns, rsLoRA).

    peft keeps ``scaling[adapter] = lora_alpha / r`` per layer, so alpha = scaling * r reproduces it.
    """
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    layers: Layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, PeftLoraLayer) and adapter_name in module.lora_A:
            down = module.lora_A[adapter_name].weight.detach()
            up = module.lora_B[adapter_name].weight.detach()
            layers[name] = LoraLayer(down=down, up=up, alpha=module.scaling[adapter_name] * down.shape[0])
    return layers


def count_lora_modules(model: torch.nn.Module) -> int:
    """How many modules of ``model`` carry a peft LoRA adapter (to check a load did not skip any)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return sum(1 for m in model.modules() if isinstance(m, PeftLoraLayer) and len(m.lora_A) > 0)


# ---------------------------------------------------------------------------------------------- writing
def to_diffusers(layers: Layers, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """peft-style keys that ``load_lora_weights`` accepts; alpha / r is folded into ``lora_B``."""
    out = {}
    for module, layer in layers.items():
        key = f"{prefix}.{module}" if prefix else module
        out[f"{key}.lora_A.weight"] = layer.down.contiguous()
        up = layer.up if layer.scale == 1.0 else (layer.up.float() * layer.scale).to(layer.up.dtype)
        out[f"{key}.lora_B.weight"] = up.contiguous()
    return out


def to_kohya(layers: Layers) -> dict[str, torch.Tensor]:
    """kohya keys ``lora_unet_<path_with_underscores>.lora_down/.lora_up/.alpha`` (alpha as a 0-d fp32 tensor)."""
    out = {}
    for module, layer in layers.items():
        key = KOHYA_PREFIX + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.down.contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    return out


def convert(state_dict: Mapping[str, torch.Tensor], to: str, module_names: Iterable[str] | None = None):
    """Any supported layout -> 'diffusers' or 'kohya' tensors."""
    layers = read_lora(state_dict, module_names)
    if to == "diffusers":
        return to_diffusers(layers)
    if to == "kohya":
        return to_kohya(layers)
    raise UserError(f"unknown LoRA format {to!r}; choose diffusers or kohya")


def save_lora(layers: Layers, path: str | Path, to: str = "diffusers") -> Path:
    """Write ``layers`` as one safetensors file (a folder gets the standard file name)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / (LORA_WEIGHT_NAME if to == "diffusers" else KOHYA_WEIGHT_NAME)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = to_diffusers(layers) if to == "diffusers" else to_kohya(layers)
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(p), metadata={"format": "pt"})
    return p


# ---------------------------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_lora_into_unet(unet: torch.nn.Module, lora: Mapping[str, torch.Tensor] | Layers, scale: float = 1.0) -> int:
    """Fold a LoRA into the weights in place: ``W += scale * (alpha / r) * up @ down``; returns the module count.

    ``lora`` is a state dict in any supported layout or already-read ``Layers``. Works on any model whose
    adapted modules are plain Linear/Conv2d (no peft needed); the result is tested against diffusers'
    ``load_lora_weights`` + ``fuse_lora``.
    """
    names = [n for n, _ in unet.named_modules()]
    layers = lora if lora and isinstance(next(iter(lora.values())), LoraLayer) else read_lora(lora, names)
    modules = dict(unet.named_modules())
    for name, layer in layers.items():
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise UserError(f"LoRA module {name} is not a weight-carrying module of the model")
        weight = modules[name].weight
        delta = layer.delta().to(weight.device)
        if delta.shape != weight.shape:
            raise UserError(
                f"LoRA module {name}: update {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}"
            )
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))
    logger.info("merged LoRA into %d modules (scale %s)", len(layers), scale)
    return len(layers)
