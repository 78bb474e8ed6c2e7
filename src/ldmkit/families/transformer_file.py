"""Single original-layout transformer files of the flow families: the FLUX.1 (Black Forest Labs) and SD3 / SD3.5
(Stability AI MMDiT) ``.safetensors`` files that ComfyUI users keep in ``models/diffusion_models`` (or SAI's
``sd3.5_*.safetensors`` with the transformer under ``model.diffusion_model.``), with the text encoders, tokenizers,
VAE and scheduler taken from a diffusers folder or a Hugging Face repo in the local cache
(``model.components_from``; default: the released model's repo in the cache, as diffusers' ``from_single_file``
falls back to it).

Reading goes through diffusers' ``FluxTransformer2DModel.from_single_file`` / ``SD3Transformer2DModel.
from_single_file`` with ``config=`` the components folder (offline), and the result is a diffusers folder in
ldmkit's cache whose ``transformer/`` is the converted file and whose other parts link to the components folder, so
everything downstream (families, pipelines, LoRA exports) sees an ordinary diffusers folder.

Writing (``save_transformer_file``, for ``ldmkit tiny-model --single-file`` and tests) needs the diffusers ->
original direction, which diffusers does not ship (its ``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers`` in loaders/single_file_utils.py only read), so it is written by
hand: the linear modules from the layouts ldmkit's LoRA copies already use (``ldmkit.lora.flux_layout`` /
``sd3_layout``: fused projections are the parts' weights concatenated, AdaLN halves swapped where diffusers swaps
them), the rest (qk norms, SD3's patch embedding) from the renames below; tests check that diffusers' reader gives
back the transformer's outputs exactly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ldmkit.errors import UserError
from ldmkit.lora.flux_layout import FLUX1_WIDTHS

log = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."
"""The prefix of the transformer in SAI's all-in-one SD3.5 files (and some FLUX repacks); diffusers strips it."""

KINDS = {
    "flux": ("FLUX.1 (guidance-distilled, dev-like)", "FluxPipeline", "FluxTransformer2DModel"),
    "flux-schnell": ("FLUX.1 (schnell-like, no guidance embedding)", "FluxPipeline", "FluxTransformer2DModel"),
    "sd3": ("SD3 / SD3.5 MMDiT", "StableDiffusion3Pipeline", "SD3Transformer2DModel"),
}
"""kind -> (description, diffusers pipeline class, transformer class)."""

RELEASED = {
    "flux": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
}
"""The diffusers repos whose components fit each released architecture (looked up in the local cache only)."""


def transformer_kind(keys) -> str | None:
    """``flux`` / ``flux-schnell`` / ``sd3`` when the state-dict keys are an original-layout flow transformer
    (BFL's ``double_blocks``, SAI's ``joint_blocks``; the keys diffusers' ``infer_diffusers_model_type`` looks
    at), else None. ``guidance_in`` is FLUX.1-dev's guidance embedding (schnell has none)."""
    names = {k.removeprefix(PREFIX) for k in keys}
    if any(k.startswith("double_blocks.") for k in names):
        return "flux" if any(k.startswith("guidance_in.") for k in names) else "flux-schnell"
    if any(k.startswith("joint_blocks.") for k in names):
        return "sd3"
    return None


def released_repo(kind: str, keys) -> str:
    """The released repo whose components fit a file of ``kind``: SD3.5 Medium has the dual attention
    (``x_block.attn2``), Large 38 joint blocks, SD3 Medium 24 without attn2."""
    if kind != "sd3":
        return RELEASED[kind]
    names = {k.removeprefix(PREFIX) for k in keys}
    if any(".x_block.attn2." in k for k in names):
        return RELEASED["sd35-medium"]
    blocks = {int(k.split(".")[1]) for k in names if k.startswith("joint_blocks.")}
    return RELEASED["sd35-large"] if len(blocks) >= 38 else RELEASED["sd3-medium"]


# ---- reading ----------------------------------------------------------------------------------------
def build_folder(path: Path, kind: str, dtype: torch.dtype, components: Path, out_dir: Path) -> None:
    """Write the diffusers folder of transformer file ``path`` (of ``kind``, weights in ``dtype``) to
    ``out_dir``: ``transformer/`` converted by diffusers' ``from_single_file`` on the components folder's
    transformer config (offline), every other part a link to ``components``."""
    import diffusers

    from ldmkit.families.single_file import _quiet_component_bar

    what, pipeline, transformer = KINDS[kind]
    index_path = components / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get("_class_name") != pipeline:
        raise UserError(
            f"model.components_from {components} is not a {pipeline} folder (its model_index.json names "
            f"{index.get('_class_name')}), but {path.name} is a {what} transformer: give a {pipeline} folder or repo"
        )
    cls = getattr(diffusers, transformer)
    try:
        if kind != "sd3" and _flux_widths(components) != FLUX1_WIDTHS:
            model = _read_other_widths(path, cls, components, kind, dtype)
        else:
            with _quiet_component_bar():
                model = cls.from_single_file(
                    str(path), config=str(components), subfolder="transformer", local_files_only=True, torch_dtype=dtype
                )
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"{path.name} does not fit the transformer config of {components} ({str(e).splitlines()[0][:200]}): "
            "model.components_from must be the same model (e.g. FLUX.1-dev for a FLUX.1-dev fine-tune)"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "transformer")
    for name, spec in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(spec, list) or spec[0] is None:
            continue
        # A link, not a copy: T5-XXL alone is ~9 GB; the folder is a view of the components folder.
        (out_dir / name).symlink_to((components / name).resolve(), target_is_directory=True)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info("%s: a %s transformer, the rest from %s", path.name, what, components)


def _flux_widths(components: Path) -> tuple[int, int]:
    from ldmkit.lora.flux_layout import widths

    return widths(json.loads((components / "transformer" / "config.json").read_text()))


def _read_other_widths(path: Path, cls, components: Path, kind: str, dtype: torch.dtype) -> torch.nn.Module:
    """A FLUX file whose widths are not FLUX.1's: diffusers' reader splits the single blocks' ``linear1`` at
    FLUX.1's widths (``inner_dim = 3072`` in convert_flux_transformer_checkpoint_to_diffusers), so such a file
    (the tiny twins) is split here with the widths of the components' config, as ``from_original``."""
    from safetensors.torch import load_file

    config = cls.load_config(components, subfolder="transformer")
    model = cls.from_config(config)
    sd = {k.removeprefix(PREFIX): v for k, v in load_file(str(path)).items()}
    model.load_state_dict(
        {k: v.to(dtype) for k, v in from_original(sd, config, kind).items()}, strict=True, assign=True
    )
    return model


def from_original(sd: Mapping[str, torch.Tensor], config: Mapping, kind: str) -> dict[str, torch.Tensor]:
    """The inverse of ``to_original``: fused weights split into their parts at the config's widths, halves
    swapped back, the other weights renamed back; keys of other models in the file (VAE, text encoders) left out."""
    from ldmkit.lora.flux_layout import flux_layout
    from ldmkit.lora.sd3_layout import sd3_layout

    layout, renames = (sd3_layout, _SD3_RENAMES) if kind == "sd3" else (flux_layout, _FLUX_RENAMES)
    out: dict[str, torch.Tensor] = {}
    for module in layout(config):
        for param in ("weight", "bias"):
            value = sd.get(f"{module.name}.{param}")
            if value is None:
                continue
            if module.swap_halves:
                value = torch.cat(value.chunk(2, dim=0)[::-1], dim=0)
            pieces = value.split(list(module.sizes), dim=0) if len(module.parts) > 1 else (value,)
            out.update({f"{p}.{param}": t.contiguous() for p, t in zip(module.parts, pieces)})
    for key, value in sd.items():
        old = _rename(key, renames, forward=False)
        if old is not None:
            out[old] = value
    return out


# ---- writing ----------------------------------------------------------------------------------------
_FLUX_RENAMES = (
    ("transformer_blocks.{i}.attn.norm_{p}.weight", "double_blocks.{i}.img_attn.norm.{pp}_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_added_{p}.weight", "double_blocks.{i}.txt_attn.norm.{pp}_norm.scale"),
    ("single_transformer_blocks.{i}.attn.norm_{p}.weight", "single_blocks.{i}.norm.{pp}_norm.scale"),
)
"""The non-linear weights of FluxTransformer2DModel <-> BFL (convert_flux_transformer_checkpoint_to_diffusers):
``{i}`` a block index, ``{p}`` q / k, ``{pp}`` BFL's query / key."""

_SD3_RENAMES = (
    ("pos_embed.pos_embed", "pos_embed"),
    ("pos_embed.proj.{w}", "x_embedder.proj.{w}"),
    ("transformer_blocks.{i}.attn.norm_{p}.weight", "joint_blocks.{i}.x_block.attn.ln_{p}.weight"),
    ("transformer_blocks.{i}.attn.norm_added_{p}.weight", "joint_blocks.{i}.context_block.attn.ln_{p}.weight"),
    ("transformer_blocks.{i}.attn2.norm_{p}.weight", "joint_blocks.{i}.x_block.attn2.ln_{p}.weight"),
)
"""The non-linear weights of SD3Transformer2DModel <-> SAI MMDiT (convert_sd3_transformer_checkpoint_to_diffusers):
``{w}`` weight / bias."""

_FIELDS = {"i": r"\d+", "w": "weight|bias", "p": "q|k", "pp": "query|key"}


def _rename(key: str, renames, forward: bool) -> str | None:
    """``key`` through the first matching template pair of ``renames`` (diffusers -> original when ``forward``),
    or None."""
    for diffusers_name, original in renames:
        src, dst = (diffusers_name, original) if forward else (original, diffusers_name)
        pattern = re.escape(src)
        for name, alternatives in _FIELDS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alternatives})")
        if m := re.fullmatch(pattern, key):
            fields = m.groupdict()
            if "pp" in fields:
                fields["p"] = fields["pp"][0]
            if "p" in fields:
                fields["pp"] = {"q": "query", "k": "key"}[fields["p"]]
            return dst.format(**fields)
    return None


def to_original(sd: Mapping[str, torch.Tensor], config: Mapping, kind: str) -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict -> the original layout of ``kind`` (``flux``/``flux-schnell``/``sd3``):
    each linear of the layout is its diffusers parts' weights (and biases) concatenated along the outputs, halves
    swapped where diffusers swaps them (``swap_scale_shift``); every other weight renamed. Raises ValueError when a
    weight has no original name (a config the layouts do not describe)."""
    from ldmkit.lora.flux_layout import flux_layout
    from ldmkit.lora.sd3_layout import sd3_layout

    layout, renames = (sd3_layout, _SD3_RENAMES) if kind == "sd3" else (flux_layout, _FLUX_RENAMES)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in layout(config):
        for param in ("weight", "bias"):
            names = [f"{p}.{param}" for p in module.parts]
            if not all(n in sd for n in names):
                continue
            value = torch.cat([sd[n] for n in names], dim=0)
            if module.swap_halves:  # diffusers (scale, shift) -> the original (shift, scale)
                value = torch.cat(value.chunk(2, dim=0)[::-1], dim=0)
            out[f"{module.name}.{param}"] = value
            used.update(names)
    for key, value in sd.items():
        if key in used:
            continue
        new = _rename(key, renames, forward=True)
        if new is None:
            raise ValueError(f"no original-layout name for transformer weight {key}")
        out[new] = value
    return out


def save_transformer_file(transformer: torch.nn.Module, out_file: str | Path) -> Path:
    """Write a diffusers FLUX.1 / SD3 transformer as one original-layout ``.safetensors`` (no prefix: the layout
    of BFL's ``flux1-dev.safetensors`` and of ComfyUI's ``diffusion_models``)."""
    from safetensors.torch import save_file

    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise UserError(f"single-file output must end in .safetensors: {out}")
    config = dict(transformer.config)
    if type(transformer).__name__ == "SD3Transformer2DModel":
        kind = "sd3"
    else:
        kind = "flux" if config.get("guidance_embeds") else "flux-schnell"
    sd = to_original(transformer.state_dict(), config, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(out), metadata={"format": "pt"})
    return out
