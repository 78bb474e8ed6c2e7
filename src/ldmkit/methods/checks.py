"""Cross-checks of a resolved config against the model it names, run when the config is resolved (so
``--dry-run`` catches them) and reading config files only: a mismatch that would otherwise train silently
wrong, or crash hours later in validation, stops at once with one line naming both sides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldmkit.config import Config
from ldmkit.errors import UserError

FAMILY_KEYS = {"SD": "sd", "SDXL": "sdxl", "U-ViT": "uvit", "SD3": "sd3", "FLUX": "flux"}


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _vae_config(ref: str) -> dict[str, Any] | None:
    root = Path(ref)
    return _json(root / "config.json") or _json(root / "vae" / "config.json") if root.is_dir() else None


def model_family(cfg: Config) -> type | None:
    """The family class of model.pretrained when files on disk tell it without converting anything (a
    diffusers folder, a single .safetensors file); None otherwise (a repo id: the method resolves it)."""
    ref = cfg.model.pretrained
    if not ref:
        return None
    root = Path(ref)
    if (root / "model_index.json").is_file() or (root.is_file() and root.suffix == ".safetensors"):
        from ldmkit.families import detect_family

        return detect_family(root)
    return None


def fill_family_defaults(cfg: Config) -> None:
    """Settings whose default depends on the model family, filled in when the config is resolved so that
    ``--dry-run`` and config.yaml show what runs, and checked against the value in effect: LCD's w_min
    (``resolve_w_min``), the LoRA's alpha and targets (``resolve_lora``) and what a flow teacher changes
    (``resolve_flow``: fine-tuning's objective knobs and validation guidance, DMD2's sampler grid and validation
    steps), for every method config that has them."""
    family = model_family(cfg)
    for resolve in ("resolve_w_min", "resolve_lora", "resolve_flow"):
        if hasattr(cfg.method, resolve):
            getattr(cfg.method, resolve)(family)


def check_denoiser_model(cfg: Config) -> None:
    """For methods that train on or distil a model folder: family as the recipe expects, VAE latent channels
    = denoiser input channels, a separate VAE of the same scale as the model's own, and a resolution the
    VAE and the denoiser can take. Single files and repo ids are checked when loaded (resolving them here
    would convert or read whole checkpoints); folders here."""
    from ldmkit.families import detect_family

    fill_family_defaults(cfg)
    root = Path(cfg.model.pretrained)
    if not (root / "model_index.json").is_file():
        return
    family = detect_family(root)
    expected = cfg.model.family
    if expected and FAMILY_KEYS.get(family.name) != expected:
        raise UserError(
            f"model.family={expected}: the recipe is written for {expected}, but model.pretrained is a "
            f"{family.name} model ({root}); use a recipe for {family.name}, or model.family=null"
        )
    denoiser = _json(root / "unet" / "config.json")
    own_vae = _json(root / "vae" / "config.json")
    vae = _vae_config(cfg.model.vae) if cfg.model.vae else own_vae
    if denoiser is None or vae is None:
        return
    in_channels = denoiser.get("in_channels")
    if in_channels is not None and vae.get("latent_channels") not in (None, in_channels):
        raise UserError(
            f"the VAE makes {vae['latent_channels']}-channel latents but the denoiser of {root} takes {in_channels}: "
            "use the model's own VAE or one of its family"
        )
    if cfg.model.vae and own_vae is not None:
        a, b = own_vae.get("scaling_factor"), vae.get("scaling_factor")
        if a is not None and b is not None and abs(a - b) > 1e-6:
            raise UserError(
                f"model.vae has scaling_factor {b} but {root}'s own VAE has {a} (a VAE of another family, e.g. "
                "SDXL's with SD1.5?): latents would be mis-scaled; use a VAE of the model's family"
            )
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    res = cfg.data.resolution
    if family.name == "U-ViT":
        size = denoiser.get("sample_size")
        if size is not None and res // vae_factor != size:
            raise UserError(
                f"data.resolution={res} gives {res // vae_factor} x {res // vae_factor} latents, but the U-ViT of "
                f"{root} takes a {size} x {size} grid: set data.resolution={size * vae_factor}"
            )
        return
    down = 2 ** (len(denoiser.get("block_out_channels", [0])) - 1)
    if res % (vae_factor * down):
        raise UserError(
            f"data.resolution={res} is not a multiple of {vae_factor * down} (VAE factor {vae_factor} x the "
            f"UNet's downsampling {down}): the UNet cannot take its latents"
        )


def check_features_fit(cfg: Config) -> None:
    """``uvit`` on a feature folder: the features' resolution must be the training resolution (the U-ViT's
    grid is built from data.resolution)."""
    meta = _json(Path(cfg.data.path) / "meta.json") if cfg.data.path else None
    if meta and "resolution" in meta and meta["resolution"] != cfg.data.resolution:
        raise UserError(
            f"the features in {cfg.data.path} were prepared at {meta['resolution']} px but data.resolution="
            f"{cfg.data.resolution}: set data.resolution={meta['resolution']} (or prepare features at "
            f"{cfg.data.resolution} px)"
        )
