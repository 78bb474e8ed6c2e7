"""Model families: one module per family (sd, sdxl, uvit, sd3, flux), the interface in base.py.

``load_family(model_cfg)`` resolves ``model.pretrained`` (a diffusers folder, a single-file SD1.x / SD2.x /
SDXL checkpoint, or a Hugging Face repo id in the local cache: hub.py), detects its family and returns
the (lazy) family object. A new family is one module with a ``Family`` subclass plus one line in
``detect_family``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ldmkit.errors import UserError
from ldmkit.families.base import Family, require
from ldmkit.families.flux import FluxFamily
from ldmkit.families.hub import resolve_model, resolve_vae
from ldmkit.families.sd import SDFamily
from ldmkit.families.sd3 import SD3Family
from ldmkit.families.sdxl import SDXLFamily
from ldmkit.families.single_file import FAMILY_NAMES, SUFFIXES, detect_kind, read_keys
from ldmkit.families.transformer_file import KINDS, transformer_kind
from ldmkit.families.uvit import FlowUViTFamily, UViTFamily, uvit_family

__all__ = [
    "Family",
    "FluxFamily",
    "SD3Family",
    "SDFamily",
    "SDXLFamily",
    "FlowUViTFamily",
    "UViTFamily",
    "detect_family",
    "load_family",
    "resolve_model",
    "resolve_model_cfg",
]

log = logging.getLogger(__name__)


def detect_family(pretrained: str | Path, *, allow_pickle: bool = False) -> type[Family]:
    """The family class of a model: for a diffusers folder from its model_index.json (the pipeline
    ``_class_name`` UViTPipeline, StableDiffusion3Pipeline (SD3) or FluxPipeline (FLUX), else a second text
    encoder: SDXL, else SD1.x/2.x); for a single-file checkpoint from its state-dict keys
    (single_file.detect_kind; logged)."""
    if not str(pretrained):
        raise UserError("model.pretrained is empty: set it to a diffusers folder, a .safetensors file or a repo id")
    root = Path(pretrained)
    if root.suffix in SUFFIXES and root.is_file():
        keys = read_keys(root, allow_pickle)[0]
        flow = transformer_kind(keys)
        if flow is not None:  # a single FLUX / SD3 transformer file (its other parts: model.components_from)
            log.info("%s: detected a %s transformer", root.name, KINDS[flow][0])
            return SD3Family if flow == "sd3" else FluxFamily
        kind = detect_kind(keys)
        log.info("%s: detected a %s checkpoint", root.name, FAMILY_NAMES[kind])
        return SDXLFamily if kind == "sdxl" else SDFamily
    if not root.is_dir():
        raise UserError(f"model.pretrained folder not found: {root}")
    require(root / "model_index.json", "model_index.json of model.pretrained")
    index = json.loads((root / "model_index.json").read_text())
    by_class = {"UViTPipeline": UViTFamily, "StableDiffusion3Pipeline": SD3Family, "FluxPipeline": FluxFamily}
    if index.get("_class_name") in by_class:
        cls = by_class[index["_class_name"]]
        return uvit_family(root) if cls is UViTFamily else cls  # a U-ViT's objective is in its unet config
    if (index.get("text_encoder_2") or [None])[0] is not None:
        return SDXLFamily
    return SDFamily


def resolve_model_cfg(model_cfg: Any) -> tuple[Path, str | None]:
    """(diffusers folder of model.pretrained, model.vae as a folder or None), every reference kind resolved."""
    opts = dict(
        allow_pickle=getattr(model_cfg, "allow_pickle", False),
        tokenizer=getattr(model_cfg, "tokenizer", None),
        prediction_type=getattr(model_cfg, "prediction_type", None),
        components_from=getattr(model_cfg, "components_from", None),
    )
    root = resolve_model(model_cfg.pretrained, **opts)
    vae = model_cfg.vae and str(resolve_vae(model_cfg.vae, root, allow_pickle=opts["allow_pickle"]))
    return root, vae


def load_family(
    model_cfg: Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Family:
    """The family object of ``model_cfg`` (``pretrained``, ``vae``, ``variant``, ``allow_pickle``, ``tokenizer``,
    ``prediction_type``; ldmkit.config.ModelConfig). Nothing is loaded yet; ``kwargs``: ``denoiser_dtype``,
    ``text_dtype``, ``encode_batch_size``."""
    root, vae = resolve_model_cfg(model_cfg)
    cls = detect_family(root)
    kwargs.setdefault("quantize", getattr(model_cfg, "quantize", None))
    return cls(str(root), vae=vae, variant=model_cfg.variant, dtype=dtype, device=device, **kwargs)
