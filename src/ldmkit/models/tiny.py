"""Tiny, randomly initialised SD1.5 / SD2 (v-prediction) / SDXL pipelines, built offline in about a second.

They use the same classes and config conventions as the real checkpoints (UNet2DConditionModel with
CrossAttn/Down/Up blocks, AutoencoderKL with an 8x downsampling encoder, CLIPTextModel and, for SDXL,
CLIPTextModelWithProjection plus ``addition_embed_type="text_time"``), so every code path of ldmkit
(training, LoRA targets, exports, stock diffusers pipelines) runs on CPU in tests and debug recipes.
``sd2v`` is SD2.1's layout: an OpenCLIP-style text encoder (gelu), linear transformer projections, per-level
head counts and a v-prediction DDIM scheduler. SDXL's two text encoders have different widths, as in the
real model (768 / 1280): single-file loaders tell the two apart by width.
The UNets contain every LCM-LoRA target module kind (to_q ... time_emb_proj, as diffusers' train_lcm_distill_lora_sd_wds.py lists them).

The tokenizer is a byte-level CLIP tokenizer with no merges (transformers' CLIPTokenizer accepts it): the 256 byte
characters, the same with ``</w>``, plus ``<|startoftext|>`` / ``<|endoftext|>``. Every character becomes
one token; that needs no download and loads in transformers' CLIPTokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

ARCHS = ("sd15", "sd2v", "sdxl")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEXT_HIDDEN = 32  # hidden size of the tiny CLIP text encoder (SDXL: the first one)
TEXT_HIDDEN_2 = 48  # SDXL's second text encoder
TIME_EMBED = 8  # SDXL addition_time_embed_dim (256 in the real model)

# Scheduler configs as shipped in the real model folders (runwayml SD1.5 / stabilityai SDXL base);
# clip_sample / skip_prk_steps appear there because those files were saved from other schedulers.
_SCHEDULERS = {
    "sd15": {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sd2v": {  # stabilityai/stable-diffusion-2-1
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
}


def byte_vocab() -> dict[str, int]:
    """The offline CLIP vocabulary: 256 byte characters, the same with ``</w>``, then BOS and EOS."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2 byte -> unicode characters
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def byte_tokenizer():
    """The byte-level CLIPTokenizer (max length 77 like CLIP)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)


def _write_slow_tokenizer_files(out_dir: Path) -> None:
    """vocab.json and an empty merges.txt next to tokenizer.json, as real SD folders have them, so the
    slow CLIPTokenizer of older transformers loads the folder too."""
    (out_dir / "vocab.json").write_text(json.dumps(byte_vocab(), ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")


def _text_encoder(with_projection: bool, width: int = TEXT_HIDDEN, gelu: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    n = len(byte_vocab())
    config = CLIPTextConfig(
        vocab_size=n,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=n - 2,
        eos_token_id=n - 1,  # pooled output is taken at the EOS position
        pad_token_id=n - 1,
        hidden_act="gelu" if with_projection or gelu else "quick_gelu",  # OpenCLIP vs OpenAI ViT-L
        projection_dim=width,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    # 4 levels like SD's KL-f8 (3 downsamplings: 64 px -> 8x8 latents), with tiny widths.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _unet(arch: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
    if arch == "sd15":
        # SD1.5 order: cross-attention blocks at high resolution, a plain block at the bottom.
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            **common,
        )
    if arch == "sd2v":
        # SD2.x: SD1.5's block order with linear proj_in/out and a head count per level.
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            **common,
        )
    # SDXL order: a plain block first; linear proj_in/out; prompt embeds = both encoders concatenated;
    # add_embedding input = 6 time ids * addition_time_embed_dim + pooled (text_encoder_2 projection).
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_HIDDEN_2,
        **common,
    )


def build_tiny_pipeline(arch: Literal["sd15", "sd2v", "sdxl"], out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD1.5, SD2 (v-prediction) or SDXL diffusers pipeline folder to ``out_dir`` and return its path.

    The global torch RNG is left untouched (weights are drawn inside ``fork_rng``), and the same seed
    gives the same weights.
    """
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from ldmkit.errors import UserError

    if arch not in ARCHS:
        raise UserError(f"unknown tiny model arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    out = Path(out_dir)
    sched_cfg = _SCHEDULERS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch in ("sd15", "sd2v"):
            scheduler = (PNDMScheduler if arch == "sd15" else DDIMScheduler).from_config(sched_cfg)
            pipe = StableDiffusionPipeline(
                unet=_unet(arch),
                vae=_vae(0.18215),
                text_encoder=_text_encoder(False, gelu=arch == "sd2v"),
                tokenizer=byte_tokenizer(),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                unet=_unet(arch),
                vae=_vae(0.13025),
                text_encoder=_text_encoder(False),
                text_encoder_2=_text_encoder(True, TEXT_HIDDEN_2),
                tokenizer=byte_tokenizer(),
                tokenizer_2=byte_tokenizer(),
                scheduler=EulerDiscreteScheduler.from_config(sched_cfg),
                force_zeros_for_empty_prompt=True,
            )
    pipe.save_pretrained(out)
    for name in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
        _write_slow_tokenizer_files(out / name)
    # The exact keys of the real folders (from_config dropped the ones the class does not take).
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")
    log.debug("wrote tiny %s pipeline to %s", arch, out)  # the command prints its own line
    return out
