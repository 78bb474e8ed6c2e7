"""U-ViT: a ViT backbone for latent diffusion (Bao et al., "All are Worth Words: A ViT Backbone for
Diffusion Models", CVPR 2023; architecture of baofff/U-ViT ``libs/uvit_t2i.py``).

Every input is a token: one time token, the text tokens and the latent patches. Long skips join
in-block i to out-block depth//2-1-i (last in, first out). The class is a diffusers ``ModelMixin`` so
``save_pretrained``/``from_pretrained`` and ``enable_gradient_checkpointing`` work, and its forward takes
the arguments a diffusers pipeline gives a UNet: ``model(latents, t, encoder_hidden_states=...,
timestep_cond=..., return_dict=False)[0]``.

Timesteps follow diffusers (0..999; a flow U-ViT, ``objective="flow"``: sigma * 1000 in [0, 1000], embedded the
same way). The original samples n in 1..1000 for the same noise level
(its alphas_cumprod[n] is diffusers' alphas_cumprod[n-1]); ``forward`` embeds ``t + 1`` so weights and
sinusoid phases match the original. This is the only place the two conventions meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# Sizes of the paper (Table 1; "depth" counts in + out blocks, the mid-block comes on top).
UVIT_PRESETS: dict[str, dict[str, int]] = {
    "uvit-tiny": dict(embed_dim=32, depth=2, num_heads=2),  # tests
    "uvit-s": dict(embed_dim=512, depth=12, num_heads=8),  # U-ViT-S/2, ~45M with 768-wide context
    "uvit-s-deep": dict(embed_dim=512, depth=16, num_heads=8),  # U-ViT-S/2 (Deep), ~58M
    "uvit-m": dict(embed_dim=768, depth=16, num_heads=12),
    "uvit-l": dict(embed_dim=1024, depth=20, num_heads=16),
    "uvit-h": dict(embed_dim=1152, depth=28, num_heads=16),
}


@dataclass
class UViTOutput(BaseOutput):
    sample: torch.Tensor
    """Predicted noise (or velocity) [B, C, H, W]."""


def unpatchify(x: torch.Tensor, channels: int, rows: int) -> torch.Tensor:
    """Patch tokens (B, rows*cols, p*p*C) -> image (B, C, rows*p, cols*p), in the original's order
    ``B (h w) (p1 p2 C) -> B C (h p1) (w p2)``."""
    B, N, P = x.shape
    cols, p = N // rows, int(round((P // channels) ** 0.5))
    x = x.reshape(B, rows, cols, p, p, channels)  # (B, h, w, p1, p2, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, rows * p, cols * p)  # (B, C, h*p1, w*p2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)  # no qkv bias, as the original
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse their long skip with Linear(2D -> D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, 2D) -> (B, N, D)
        x = x + self.attn(self.norm1(x))  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class UViT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-conditioned U-ViT predicting noise for latents [B, in_channels, sample_size, sample_size].

    ``pooled_context`` (not in the original) adds a projection of the mean of the text embeddings to every
    patch token: a direct path from the caption to the image tokens besides attention, as class-conditional
    diffusion models add their label embedding (Ho et al. 2020's conditional variants, DiT's adaLN; GLIDE adds
    its pooled text token to the timestep embedding). See configs/uvit/quickstart.yaml for what it measured.

    ``time_cond_proj_dim`` adds a zero-initialised projection of ``timestep_cond`` (the LCM guidance-scale
    embedding) onto the time token, the U-ViT counterpart of UNet2DConditionModel's ``cond_proj``.
    diffusers' ``PeftAdapterMixin`` gives it the UNet's LoRA methods (add_adapter, disable_adapters,
    load_lora_adapter, fuse_lora, unload_lora, ...).

    ``objective`` records what the network was trained for (the network itself is the same): "diffusion" (DDPM:
    eps or v, timesteps 0..999) or "flow" (rectified flow: the velocity eps - x_0 at timestep sigma * 1000, as
    SD3's transformer). Saved in the config, it tells ``ldmkit.families`` which family (and forward process) a
    U-ViT folder is, for every stage and command that loads it.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        context_dim: int = 768,
        num_text_tokens: int = 77,
        time_cond_proj_dim: int | None = None,
        pooled_context: bool = False,
        objective: str = "diffusion",
    ):
        super().__init__()
        if objective not in ("diffusion", "flow"):
            raise ValueError(f"U-ViT objective must be 'diffusion' or 'flow', got {objective!r}")
        if sample_size % patch_size or depth % 2 or embed_dim % num_heads:
            raise ValueError(
                f"U-ViT needs sample_size % patch_size == 0, even depth and embed_dim % num_heads == 0; got "
                f"sample_size={sample_size}, patch_size={patch_size}, depth={depth}, embed_dim={embed_dim}, num_heads={num_heads}"
            )
        self.gradient_checkpointing = False
        self.extras = 1 + num_text_tokens  # time token + text tokens, dropped again by the head
        num_patches = (sample_size // patch_size) ** 2

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.context_embed = nn.Linear(context_dim, embed_dim)
        self.cond_proj = nn.Linear(time_cond_proj_dim, embed_dim) if time_cond_proj_dim else None
        self.pooled_embed = nn.Linear(context_dim, embed_dim) if pooled_context else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth // 2))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, skip=True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """As the original (timm ViT): truncated normal 0.02 for Linear weights and the position embedding."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cond_proj is not None:
            # Zero init: a student built from a teacher starts equal to it (docs/DESIGN.md; the LCM references leave it random).
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def _block(self, block: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, skip)
        return block(x, skip)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused,
    ) -> UViTOutput | tuple[torch.Tensor]:
        """``unused`` swallows UNet-only keywords a diffusers pipeline may pass (cross_attention_kwargs, ...)."""
        B, C, H, W = sample.shape
        p, D = self.config.patch_size, self.config.embed_dim
        if H != self.config.sample_size or W != self.config.sample_size:
            raise ValueError(f"U-ViT expects {self.config.sample_size}x{self.config.sample_size} latents, got {H}x{W}")
        if encoder_hidden_states.shape[1] + 1 != self.extras:
            raise ValueError(f"U-ViT expects {self.extras - 1} text tokens, got {encoder_hidden_states.shape[1]}")
        x = self.patch_embed(sample).flatten(2).transpose(1, 2)  # (B, HW/p^2, D)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)  # (B,)
        # Original convention n = t + 1 (module docstring); sinusoid as the original: [cos, sin], no MLP.
        time_token = get_timestep_embedding(t + 1, D, flip_sin_to_cos=True, downscale_freq_shift=0).to(
            x.dtype
        )  # (B, D)
        if self.cond_proj is not None:
            if timestep_cond is None:
                raise ValueError("this U-ViT has time_cond_proj_dim set and needs timestep_cond")
            time_token = time_token + self.cond_proj(timestep_cond.to(x.dtype)).to(x.dtype)  # (B, D)
        context = self.context_embed(encoder_hidden_states.to(x.dtype))  # (B, L, D)
        if self.pooled_embed is not None:  # the caption's mean embedding added to every patch token
            x = x + self.pooled_embed(encoder_hidden_states.to(x.dtype).mean(dim=1))[:, None]  # (B, HW/p^2, D)
        x = torch.cat([time_token[:, None], context.to(x.dtype), x], dim=1)  # (B, 1+L+HW/p^2, D)
        x = x + self.pos_embed  # (B, N, D)

        skips = []
        for block in self.in_blocks:
            x = self._block(block, x)  # (B, N, D)
            skips.append(x)
        x = self._block(self.mid_block, x)  # (B, N, D)
        for block in self.out_blocks:
            x = self._block(block, x, skips.pop())  # (B, N, D); last in, first out

        x = self.decoder_pred(self.norm(x))  # (B, N, p*p*C)
        x = unpatchify(x[:, self.extras :], C, H // p)  # (B, C, H, W)
        x = self.final_layer(x)  # (B, C, H, W)
        return UViTOutput(sample=x) if return_dict else (x,)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UViT:
        """A randomly initialised U-ViT of a preset size; ``overrides`` replace any config value."""
        if name not in UVIT_PRESETS:
            raise ValueError(f"unknown U-ViT preset {name!r}; choose one of: {', '.join(UVIT_PRESETS)}")
        return cls(**{**UVIT_PRESETS[name], **overrides})
