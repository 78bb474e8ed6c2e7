"""FLUX.1 LoRAs in the original (Black Forest Labs) layout: what kohya sd-scripts writes, ComfyUI and Forge read.

diffusers' ``FluxTransformer2DModel`` splits projections that BFL's model (``flux/model.py``, the layout of the
released ``flux1-dev.safetensors``) keeps fused: a double block's image attention ``img_attn.qkv`` is diffusers'
``attn.to_q`` / ``to_k`` / ``to_v`` and a single block's ``linear1`` is ``attn.to_q`` / ``to_k`` / ``to_v`` and
``proj_mlp`` side by side in its output. A client that runs the BFL model adapts the fused linear, so a LoRA of
the separate projections is written as ONE exact LoRA of the fused one: the downs stacked along the rank, the ups
block-diagonal over the output slices (rank = the sum of the parts' ranks). ``up @ down`` is then the separate
updates stacked, so the fused module's output equals the separate ones' outputs concatenated.

The module correspondence is the one of diffusers' ``scripts/convert_flux_to_diffusers.py`` and of its LoRA
reader ``_convert_kohya_flux_lora_to_diffusers`` (``src/diffusers/loaders/lora_conversion_utils.py``), which reads
this file back, and of ComfyUI's ``comfy/utils.py`` ``flux_to_diffusers``. File names are kohya's: sd-scripts'
``networks/lora_flux.py`` (``LORA_PREFIX_FLUX = "lora_unet"``) names a module ``lora_unet_`` + its BFL path with
dots as underscores, the rule ComfyUI's ``model_lora_keys_unet`` (``comfy/lora.py``) applies to every weight of
the BFL model, so every module here loads in both. The text encoders: sd-scripts' ``lora_te1_`` (CLIP-L, which
diffusers reads too) and ``lora_te3_`` (T5).

Every scale is folded into the up weights and each alpha written as the module's rank (scale 1): diffusers drops
the alpha of ``final_layer`` modules, and parts of one fused module may carry different scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldmkit.errors import UserError
from ldmkit.lora.layers import KOHYA_WEIGHT_NAME, Layers, LoraLayer

FLUX1_WIDTHS = (3072, 12288)
"""(inner width, single-block MLP width) of every FLUX.1 release (dev, schnell, Krea, Kontext): the widths
diffusers' kohya FLUX reader assumes for ``linear1`` (``dims=[3072, 3072, 3072, 12288]``; sd-scripts'
``get_qkv_mlp_split_dims``). Other widths (the tiny twins) are read by ``read_kohya`` here."""

TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
"""sd-scripts' lora_flux.py prefixes: CLIP-L, T5-XXL."""


@dataclass(frozen=True)
class BflModule:
    """One linear of the BFL model: the diffusers modules whose outputs it concatenates (``parts``, of
    ``sizes`` output features each), and whether its output halves are swapped against diffusers' (the final
    AdaLN: BFL (shift, scale), diffusers (scale, shift); convert_flux_to_diffusers.py ``swap_scale_shift``)."""

    name: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    swap_halves: bool = False

    @property
    def kohya(self) -> str:
        return "lora_unet_" + self.name.replace(".", "_")


def widths(config: Mapping) -> tuple[int, int]:
    """(inner width, single-block MLP width) of a FluxTransformer2DModel config (its single blocks' mlp_ratio
    is 4, transformer_flux.py FluxSingleTransformerBlock)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return inner, 4 * inner


def flux_layout(config: Mapping) -> list[BflModule]:
    """Every linear of the BFL FLUX model of ``config`` (a FluxTransformer2DModel config) with its diffusers
    modules (convert_flux_to_diffusers.py, read in the other direction)."""
    inner, mlp = widths(config)
    out = [
        BflModule("img_in", ("x_embedder",)),
        BflModule("txt_in", ("context_embedder",)),
        BflModule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        BflModule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        BflModule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        BflModule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        BflModule("final_layer.linear", ("proj_out",)),
        BflModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), (2 * inner,), swap_halves=True),
    ]
    if config.get("guidance_embeds"):
        out += [
            BflModule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            BflModule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    for i in range(int(config["num_layers"])):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, qkv, proj, ff, norm in (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context"),
        ):
            out += [
                BflModule(f"{b}.{stream}_attn.qkv", tuple(f"{d}.attn.{p}" for p in qkv), (inner,) * 3),
                BflModule(f"{b}.{stream}_attn.proj", (f"{d}.attn.{proj}",)),
                BflModule(f"{b}.{stream}_mlp.0", (f"{d}.{ff}.net.0.proj",)),
                BflModule(f"{b}.{stream}_mlp.2", (f"{d}.{ff}.net.2",)),
                BflModule(f"{b}.{stream}_mod.lin", (f"{d}.{norm}.linear",)),
            ]
    for i in range(int(config["num_single_layers"])):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        qkv_mlp = (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
        out += [
            BflModule(f"{b}.linear1", qkv_mlp, (inner, inner, inner, mlp)),
            BflModule(f"{b}.linear2", (f"{d}.proj_out",)),
            BflModule(f"{b}.modulation.lin", (f"{d}.norm.linear",)),
        ]
    return out


def _swap(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse(layers: Layers, layout: list[BflModule], what: str) -> dict[str, LoraLayer]:
    """``layers`` (diffusers module paths) as ``{original module name: LoraLayer}`` of ``layout``: fused modules
    get the stacked downs and the block-diagonal up (a part the LoRA does not adapt stays a zero block); scales
    folded into the ups (alpha None = rank). ``what`` names the layout in errors."""
    known = set()
    out: dict[str, LoraLayer] = {}
    for module in layout:
        known.update(module.parts)
        present = [(i, layers[p]) for i, p in enumerate(module.parts) if p in layers]
        if not present:
            continue
        if module.sizes is None or len(module.parts) == 1:
            layer = present[0][1]
            up = layer.folded_up().float()
            if module.sizes is not None and up.shape[0] != module.sizes[0]:
                raise UserError(
                    f"LoRA module {module.parts[0]}: {up.shape[0]} outputs, the config says {module.sizes[0]}"
                )
            out[module.name] = LoraLayer(layer.down.float(), _swap(up) if module.swap_halves else up)
            continue
        offsets = [sum(module.sizes[:i]) for i in range(len(module.sizes))]
        rank = sum(layer.rank for _, layer in present)
        in_features = present[0][1].down.shape[1]
        down = torch.zeros(rank, in_features)
        up = torch.zeros(sum(module.sizes), rank)
        r = 0
        for i, layer in present:
            if layer.down.shape[1] != in_features or layer.up.shape[0] != module.sizes[i]:
                raise UserError(
                    f"LoRA module {module.parts[i]} (down {tuple(layer.down.shape)}, up {tuple(layer.up.shape)}) "
                    f"does not fit {module.name} of the config ({module.sizes[i]} outputs)"
                )
            down[r : r + layer.rank] = layer.down.float()  # (r_i, in)
            up[offsets[i] : offsets[i] + module.sizes[i], r : r + layer.rank] = layer.folded_up().float()
            r += layer.rank
        out[module.name] = LoraLayer(down, up)
    unknown = sorted(set(layers) - known)
    if unknown:
        raise UserError(f"LoRA module {unknown[0]} has no counterpart in the {what} layout ({len(unknown)} such)")
    return out


def split(original: Mapping[str, LoraLayer], modules: list[BflModule]) -> Layers:
    """The inverse of ``fuse`` for any LoRA in an original layout (scales folded into the ups): a fused module
    whose up is block-diagonal with equal ranks (what ``fuse`` writes and diffusers' reader calls sparse) splits
    into its parts' own LoRAs; another fused LoRA (sd-scripts trains one down for q, k, v) gives every part the
    whole down and its rows of the up, which is exact too."""
    layout = {m.name: m for m in modules}
    out: Layers = {}
    for name, layer in original.items():
        if name not in layout:
            raise UserError(f"LoRA module {name} is not in the original layout of this transformer")
        module = layout[name]
        up = layer.folded_up().float()
        down = layer.down.float()
        if module.swap_halves:
            up = _swap(up)
        if len(module.parts) == 1:
            out[module.parts[0]] = LoraLayer(down, up)
            continue
        if up.shape[0] != sum(module.sizes):
            raise UserError(f"LoRA module {name}: {up.shape[0]} outputs, the config says {sum(module.sizes)}")
        n = len(module.parts)
        rows = up.split(list(module.sizes), dim=0)
        r = layer.rank // n
        sparse = layer.rank % n == 0 and all(
            not torch.any(torch.cat([rows[i][:, : i * r], rows[i][:, (i + 1) * r :]], dim=1)) for i in range(n)
        )
        for i, part in enumerate(module.parts):
            if sparse:
                out[part] = LoraLayer(
                    down[i * r : (i + 1) * r].contiguous(), rows[i][:, i * r : (i + 1) * r].contiguous()
                )
            else:
                out[part] = LoraLayer(down.clone(), rows[i].contiguous())
    return out


CLIP_PREFIXES = ("lora_te1_", "lora_te2_")
"""The CLIP encoders' prefixes in sd-scripts' FLUX and SD3 files (``lora_te3_`` is T5 in both)."""


def clip_path(module: str, prefix: str) -> str:
    """A CLIP module's path as the clients name it: under ``text_model.`` (``lora_te1_text_model_encoder_layers_0_
    self_attn_q_proj``, what ComfyUI's ``model_lora_keys_clip`` and sd-scripts map), which transformers 5's
    CLIPTextModel no longer has in its module paths (``encoder.layers.0...``)."""
    inner = ("encoder.", "embeddings.", "final_layer_norm")
    return "text_model." + module if prefix in CLIP_PREFIXES and module.startswith(inner) else module


def kohya_state_dict(
    components: Mapping[str, Layers],
    config: Mapping,
    layout=None,
    text_encoder_prefixes: Mapping[str, str] = TEXT_ENCODER_PREFIXES,
) -> dict[str, torch.Tensor]:
    """``lora_unet_<original name>`` and the text encoders' (FLUX: ``lora_te1_`` / ``lora_te3_``) keys with
    ``.lora_down.weight``, ``.lora_up.weight`` (fp32) and a 0-d ``.alpha`` (= the rank: the scales are in the
    ups). ``layout``: ``config`` -> the modules (default ``flux_layout``)."""
    layout = layout or flux_layout
    out = {}
    for component, layers in components.items():
        if not layers:
            continue
        if component in ("unet", "transformer"):
            fused = fuse(layers, layout(config), "original")
            named = {m.replace(".", "_"): layer for m, layer in fused.items()}
            prefix = "lora_unet_"
        elif component in text_encoder_prefixes:
            prefix = text_encoder_prefixes[component]
            named = {
                clip_path(m, prefix).replace(".", "_"): LoraLayer(layer.down, layer.folded_up())
                for m, layer in layers.items()
            }
        else:
            raise UserError(f"no kohya name for LoRA component {component!r}")
        for flat, layer in named.items():
            out[f"{prefix}{flat}.lora_down.weight"] = layer.down.detach().float().cpu().contiguous()
            out[f"{prefix}{flat}.lora_up.weight"] = layer.up.detach().float().cpu().contiguous()
            out[f"{prefix}{flat}.alpha"] = torch.tensor(float(layer.rank))
    return out


def save_kohya(path: str | Path, components: Mapping[str, Layers], config: Mapping, **layout) -> Path:
    """The original-layout copy at ``path`` (a ``.safetensors`` file, or a folder that gets
    pytorch_lora_weights_kohya.safetensors); ``layout``: see ``kohya_state_dict`` (default FLUX's)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / KOHYA_WEIGHT_NAME
    tensors = kohya_state_dict(components, config, **layout)
    if not tensors:
        raise UserError("the LoRA has no adapted modules")
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p


def is_bfl_kohya(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A kohya file of a FLUX model: its ``lora_unet_`` keys name BFL modules (double / single blocks or the
    BFL top-level linears)."""
    tops = (
        "double_blocks_",
        "single_blocks_",
        "img_in",
        "txt_in",
        "time_in_",
        "vector_in_",
        "guidance_in_",
        "final_layer_",
    )
    return any(k.startswith(tuple("lora_unet_" + t for t in tops)) for k in state_dict)


def read_kohya(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    layout=None,
    text_encoder_prefixes: Mapping[str, str] = TEXT_ENCODER_PREFIXES,
) -> dict[str, Layers]:
    """A kohya file in an original layout (FLUX by default: ``lora_unet_`` BFL names, ``lora_te1_`` CLIP) ->
    ``{component: Layers}`` with diffusers module paths, split by ``config``'s widths (``split``); for FLUX
    transformers of widths other than FLUX.1's, which diffusers' reader rejects, and for SD3, which it does not
    read. Text-encoder modules keep their flat names (dots as underscores)."""
    modules = (layout or flux_layout)(config)
    names = {m.kohya: m.name for m in modules}
    te = {prefix: component for component, prefix in text_encoder_prefixes.items()}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        flat, _, suffix = key.partition(".")
        if flat in names:
            where = ("transformer", names[flat])
        else:
            prefix = next((p for p in te if flat.startswith(p)), None)
            if prefix is None:
                raise UserError(f"LoRA key {key} names no module of this transformer's original layout")
            where = (te[prefix], flat[len(prefix) :])
        parts.setdefault(where, {})[suffix] = value
    bfl: dict[str, LoraLayer] = {}
    out: dict[str, Layers] = {}
    for (component, module), tensors in parts.items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise UserError(f"LoRA module {module} lacks its lora_down / lora_up weights")
        alpha = tensors.get("alpha")
        layer = LoraLayer(
            tensors["lora_down.weight"], tensors["lora_up.weight"], None if alpha is None else float(alpha)
        )
        if component == "transformer":
            bfl[module] = layer
        else:
            out.setdefault(component, {})[module] = layer
    if bfl:
        out["transformer"] = split(bfl, modules)
    return out
