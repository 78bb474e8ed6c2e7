"""Model families: one module per family (sd, sdxl, uvit), the interface in base.py.

``load_family(model_cfg)`` detects the family of ``model.pretrained`` and returns its (lazy) family
object. A new family is one module with a ``Family`` subclass plus one line in ``detect_family``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldmkit.errors import UserError
from ldmkit.families.base import Family, require
from ldmkit.families.sd import SDFamily
from ldmkit.families.sdxl import SDXLFamily
from ldmkit.families.uvit import UViTFamily

__all__ = ["Family", "SDFamily", "SDXLFamily", "UViTFamily", "detect_family", "load_family"]


def detect_family(pretrained: str | Path) -> type[Family]:
    """The family class of a local diffusers-style folder, from its model_index.json: the pipeline
    ``_class_name`` (UViTPipeline), else a second text encoder (SDXL), else SD1.x/2.x."""
    if not str(pretrained):
        raise UserError("model.pretrained is empty: set it to a local diffusers model folder")
    root = Path(pretrained)
    if not root.is_dir():
        raise UserError(f"model.pretrained folder not found: {root}")
    require(root / "model_index.json", "model_index.json of model.pretrained")
    index = json.loads((root / "model_index.json").read_text())
    if index.get("_class_name") == "UViTPipeline":
        return UViTFamily
    if (index.get("text_encoder_2") or [None])[0] is not None:
        return SDXLFamily
    return SDFamily


def load_family(
    model_cfg: Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Family:
    """The family object of ``model_cfg`` (``pretrained``, ``vae``, ``variant``; ldmkit.config.ModelConfig).
    Nothing is loaded yet; ``kwargs``: ``denoiser_dtype``, ``text_dtype``, ``encode_batch_size``."""
    cls = detect_family(model_cfg.pretrained)
    return cls(model_cfg.pretrained, vae=model_cfg.vae, variant=model_cfg.variant, dtype=dtype, device=device, **kwargs)
