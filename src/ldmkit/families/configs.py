"""Component configs of the released SD1.x, SD2.x and SDXL base models, so a single-file checkpoint of
one of them loads offline (diffusers' ``from_single_file`` otherwise fetches them from the Hub, see
``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` in diffusers/loaders/single_file_utils.py).

The values are those of the diffusers folders of stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
(768 px, v-prediction) / -2-1-base (512 px, epsilon) and stabilityai/stable-diffusion-xl-base-1.0; keys
left out take the classes' defaults. Files written by ldmkit carry their own configs instead (metadata).
"""

from __future__ import annotations

import copy
from typing import Any

KINDS = ("sd1", "sd2", "sd2-v", "sdxl")

_SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
}
_CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14's text tower
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_SCHEDULER = {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "trained_betas": None, **_BETAS}


def _index(cls: str, schedulers: str, sdxl: bool = False) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": cls,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", schedulers],
    }
    if sdxl:
        index |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
        }
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    return index


def released_configs(kind: str) -> dict[str, dict[str, Any]]:
    """{relative path: config} of a released model folder of ``kind`` (one of ``KINDS``)."""
    if kind == "sd1":
        return {
            "model_index.json": _index("StableDiffusionPipeline", "PNDMScheduler"),
            "unet/config.json": {**_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
            "vae/config.json": copy.deepcopy(_SD_VAE),
            "text_encoder/config.json": copy.deepcopy(_CLIP_L),
            "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **_SCHEDULER},
        }
    if kind in ("sd2", "sd2-v"):
        v = kind == "sd2-v"
        size = 96 if v else 64
        sched = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction" if v else "epsilon", **_SCHEDULER}
        return {
            "model_index.json": _index("StableDiffusionPipeline", "DDIMScheduler"),
            "unet/config.json": {
                **_UNET,
                "attention_head_dim": [5, 10, 20, 20],
                "cross_attention_dim": 1024,
                "use_linear_projection": True,
                "sample_size": size,
            },
            "vae/config.json": {**_SD_VAE, "sample_size": size * 8},
            # OpenCLIP ViT-H/14's text tower without its last layer (SD2 conditions on the penultimate one)
            "text_encoder/config.json": {
                **_CLIP_L,
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 23,
                "hidden_act": "gelu",
                "projection_dim": 512,
            },
            "scheduler/scheduler_config.json": sched,
        }
    if kind == "sdxl":
        return {
            "model_index.json": _index("StableDiffusionXLPipeline", "EulerDiscreteScheduler", sdxl=True),
            "unet/config.json": {
                **_UNET,
                "block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10],
                "cross_attention_dim": 2048,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_embed_type_num_heads": 64,
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "sample_size": 128,
            },
            "vae/config.json": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
            "text_encoder/config.json": copy.deepcopy(_CLIP_L),
            # OpenCLIP ViT-bigG/14's text tower with its projection
            "text_encoder_2/config.json": {
                **_CLIP_L,
                "architectures": ["CLIPTextModelWithProjection"],
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_attention_heads": 20,
                "num_hidden_layers": 32,
                "hidden_act": "gelu",
                "projection_dim": 1280,
            },
            "scheduler/scheduler_config.json": {
                "_class_name": "EulerDiscreteScheduler",
                "interpolation_type": "linear",
                "prediction_type": "epsilon",
                "timestep_spacing": "leading",
                "use_karras_sigmas": False,
                **_SCHEDULER,
            },
        }
    raise ValueError(f"unknown model kind {kind!r}")


# The released rectified-flow transformers' configs (keys left out take the classes' defaults): the full-size
# shapes that benchmarks/flow_memory.py and the single-file layout tests build on the meta device.
FLUX_DEV = dict(
    num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, in_channels=64, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
"""black-forest-labs/FLUX.1-dev transformer/config.json."""
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
"""stabilityai/stable-diffusion-3.5-medium transformer/config.json."""
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
"""stabilityai/stable-diffusion-3.5-large transformer/config.json."""
