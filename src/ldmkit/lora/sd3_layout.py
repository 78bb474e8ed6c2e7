"""SD3 / SD3.5 LoRAs in the original (Stability AI MMDiT) layout: what kohya sd-scripts' ``networks/lora_sd3.py``
writes and Forge / ComfyUI read.

SAI's MMDiT (sd3-ref ``mmditx.py``, the layout of ``sd3.5_medium.safetensors``) keeps q, k, v fused per stream:
``joint_blocks.{i}.x_block.attn.qkv`` is diffusers' ``attn.to_q`` / ``to_k`` / ``to_v``,
``context_block.attn.qkv`` the text stream's ``add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, and SD3.5's
second image attention ``x_block.attn2.qkv`` is ``attn2.to_q`` / ``to_k`` / ``to_v``; they are fused as in
``ldmkit.lora.flux_layout`` (downs stacked, ups block-diagonal). The correspondence is diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` (``src/diffusers/loaders/single_file_utils.py``) read in the
other direction, including the two AdaLN projections whose halves it swaps (``swap_scale_shift``): the last
block's ``context_block.adaLN_modulation.1`` (diffusers ``norm1_context.linear``, an AdaLayerNormContinuous
there) and ``final_layer.adaLN_modulation.1``. Names: ``lora_unet_`` + the MMDiT path with dots as underscores
(sd-scripts' ``LORA_PREFIX_SD3 = "lora_unet"``; ComfyUI's ``model_lora_keys_unet`` maps every weight of the
model that way); text encoders ``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G), ``lora_te3_`` (T5), as
lora_sd3.py names them.

diffusers has no reader for this layout (its SD3 loader reads diffusers-named files, as ComfyUI also does), so
the copy is for sd-scripts and Forge; ldmkit reads it back with ``read_kohya``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ldmkit.lora import flux_layout
from ldmkit.lora.flux_layout import BflModule
from ldmkit.lora.layers import Layers

TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
"""sd-scripts' lora_sd3.py prefixes: CLIP-L, CLIP-G, T5-XXL."""


def sd3_layout(config: Mapping) -> list[BflModule]:
    """Every linear of the SAI MMDiT of ``config`` (an SD3Transformer2DModel config) with its diffusers modules;
    the patch embedding (a conv) is left out: no LoRA target of ldmkit adapts it."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    n = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    out = [
        BflModule("context_embedder", ("context_embedder",)),
        BflModule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        BflModule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        BflModule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        BflModule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        BflModule("final_layer.linear", ("proj_out",)),
        BflModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), (2 * inner,), swap_halves=True),
    ]
    for i in range(n):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        out += [
            BflModule(f"{x}.attn.qkv", tuple(f"{d}.attn.to_{p}" for p in "qkv"), (inner,) * 3),
            BflModule(f"{x}.attn.proj", (f"{d}.attn.to_out.0",)),
            BflModule(f"{x}.mlp.fc1", (f"{d}.ff.net.0.proj",)),
            BflModule(f"{x}.mlp.fc2", (f"{d}.ff.net.2",)),
            BflModule(f"{x}.adaLN_modulation.1", (f"{d}.norm1.linear",)),
            BflModule(f"{c}.attn.qkv", tuple(f"{d}.attn.add_{p}_proj" for p in "qkv"), (inner,) * 3),
        ]
        if i in dual:
            out += [
                BflModule(f"{x}.attn2.qkv", tuple(f"{d}.attn2.to_{p}" for p in "qkv"), (inner,) * 3),
                BflModule(f"{x}.attn2.proj", (f"{d}.attn2.to_out.0",)),
            ]
        if i == n - 1:  # context_pre_only: the text stream ends after its qkv; its AdaLN has (scale, shift) swapped
            out.append(BflModule(f"{c}.adaLN_modulation.1", (f"{d}.norm1_context.linear",), (2 * inner,), True))
        else:
            out += [
                BflModule(f"{c}.attn.proj", (f"{d}.attn.to_add_out",)),
                BflModule(f"{c}.mlp.fc1", (f"{d}.ff_context.net.0.proj",)),
                BflModule(f"{c}.mlp.fc2", (f"{d}.ff_context.net.2",)),
                BflModule(f"{c}.adaLN_modulation.1", (f"{d}.norm1_context.linear",)),
            ]
    return out


def kohya_state_dict(components: Mapping[str, Layers], config: Mapping) -> dict[str, torch.Tensor]:
    """The copy's tensors (see ``ldmkit.lora.flux_layout.kohya_state_dict``) in the SAI layout."""
    return flux_layout.kohya_state_dict(components, config, sd3_layout, TEXT_ENCODER_PREFIXES)


def save_kohya(path: str | Path, components: Mapping[str, Layers], config: Mapping) -> Path:
    """The SAI-layout copy at ``path`` (a ``.safetensors`` file, or a folder that gets
    pytorch_lora_weights_kohya.safetensors)."""
    return flux_layout.save_kohya(
        path, components, config, layout=sd3_layout, text_encoder_prefixes=TEXT_ENCODER_PREFIXES
    )


def is_sai_kohya(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A kohya file of an SD3 model: its ``lora_unet_`` keys name MMDiT joint blocks."""
    return any(k.startswith("lora_unet_joint_blocks_") for k in state_dict)


def read_kohya(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, Layers]:
    """A kohya SD3 file -> ``{component: Layers}`` with diffusers module paths (``flux_layout.read_kohya``)."""
    return flux_layout.read_kohya(state_dict, config, sd3_layout, TEXT_ENCODER_PREFIXES)
