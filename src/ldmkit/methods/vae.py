"""``vae``: train a KL autoencoder (diffusers AutoencoderKL) from scratch, or fine-tune one.

Objective (Rombach et al. 2022, LDM ``LPIPSWithDiscriminator`` without the perceptual and GAN terms, so
nothing needs downloaded weights): per-pixel L1 or L2 reconstruction of a posterior sample plus
``kl_weight`` times the per-sample KL to N(0, I), both divided by the number of pixel values; the
weight therefore means what LDM's ``kl_weight`` means (1e-6 in SD's VAE).

The export is a bare diffusers VAE folder whose ``scaling_factor`` is 1/std of the latents seen in the
last training steps (an exponential moving average of their first two moments, bias-corrected, summed
over all processes), as SD's 0.18215 was measured; the numbers also go to ``vae_stats.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from torch import nn

from ldmkit.errors import UserError
from ldmkit.methods.base import Method
from ldmkit.methods.configs import VAEConfig  # noqa: F401 (the configs import without torch: --help)
from ldmkit.rng import SampleRNG

if TYPE_CHECKING:
    from ldmkit.config import Config

logger = logging.getLogger(__name__)


class LatentStats:
    """Bias-corrected exponential moving averages of the latents' per-channel mean and mean square."""

    def __init__(self, channels: int, momentum: float):
        self.momentum = momentum
        self.steps = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, mean: torch.Tensor, sq: torch.Tensor) -> None:
        self.steps += 1
        self.mean.mul_(self.momentum).add_(mean.double().cpu(), alpha=1 - self.momentum)
        self.sq.mul_(self.momentum).add_(sq.double().cpu(), alpha=1 - self.momentum)

    def summary(self) -> dict:
        debias = 1 - self.momentum**self.steps
        mean, sq = self.mean / debias, self.sq / debias
        std = (sq.mean() - mean.mean() ** 2).clamp_min(1e-12).sqrt()
        return {
            "scaling_factor": float(1 / std),
            "mean": float(mean.mean()),
            "std": float(std),
            "channel_mean": mean.tolist(),
            "channel_std": (sq - mean**2).clamp_min(0).sqrt().tolist(),
            "steps": self.steps,
            "momentum": self.momentum,
        }

    def state_dict(self) -> dict:
        return {"steps": self.steps, "mean": self.mean, "sq": self.sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.mean, self.sq = int(state["steps"]), state["mean"].double(), state["sq"].double()


class AutoencoderStep(nn.Module):
    """Encode, sample with the given noise, decode: in ``forward`` so DDP synchronises gradients."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # (B, C, h, w)
        return self.vae.decode(z).sample, z, posterior.kl()  # (B, 3, H, W), (B, C, h, w), (B,)

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()


def _load_vae(cfg: Config) -> AutoencoderKL | None:
    """The VAE to fine-tune: model.vae (a VAE folder or a pipeline folder) or model.pretrained/vae."""
    for root in (cfg.model.vae, cfg.model.pretrained):
        if not root:
            continue
        for folder, sub in ((Path(root), None), (Path(root), "vae")):
            if (folder / (sub or "") / "config.json").is_file():
                return AutoencoderKL.from_pretrained(folder, subfolder=sub, variant=cfg.model.variant)
        raise UserError(f"no VAE (config.json or vae/config.json) in {root}")
    return None


class VAEMethod(Method):
    Config = VAEConfig
    trainable_names = ("net",)

    def __init__(self, cfg: Config, accelerator):
        super().__init__(cfg, accelerator)
        m = self.mcfg
        vae = _load_vae(cfg)
        if vae is None:
            if any(w % m.norm_num_groups for w in m.block_out_channels):
                raise UserError(
                    f"method.norm_num_groups={m.norm_num_groups} must divide every block_out_channels {m.block_out_channels}"
                )
            n = len(m.block_out_channels)
            vae = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(m.block_out_channels),
                layers_per_block=m.layers_per_block,
                latent_channels=m.latent_channels,
                norm_num_groups=m.norm_num_groups,
                sample_size=cfg.data.resolution,
                mid_block_add_attention=m.mid_block_attention,
            )
            logger.info("VAE from scratch: %.2fM parameters", sum(p.numel() for p in vae.parameters()) / 1e6)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if cfg.data.resolution % self.factor:
            raise UserError(f"data.resolution={cfg.data.resolution} is not a multiple of the VAE factor {self.factor}")
        self.net = AutoencoderStep(vae.to(self.device).train())
        self.stats = LatentStats(vae.config.latent_channels, m.stats_momentum)
        self._pending = torch.zeros(2, vae.config.latent_channels, dtype=torch.float64, device=self.device)
        self._pending_batches = torch.zeros((), device=self.device)
        self._preview: torch.Tensor | None = None

    @property
    def vae(self) -> AutoencoderKL:
        return self.unwrap(self.net).vae

    def loss(self, batch):
        x = batch["pixel_values"]
        if self._preview is None:
            self._preview = x[: self.mcfg.validation_images].detach().cpu()
        rng = SampleRNG(batch["seed"], self.device)
        C, h, w = self.vae.config.latent_channels, x.shape[-2] // self.factor, x.shape[-1] // self.factor
        rec, z, kl = self.net(x, rng.randn(C, h, w))
        diff = rec.float() - x.float()
        rec_loss = diff.abs().mean() if self.mcfg.loss == "l1" else diff.square().mean()
        kl_loss = kl.float().mean() / x[0].numel()
        with torch.no_grad():
            zd = z.detach().double()
            self._pending[0] += zd.mean(dim=(0, 2, 3))
            self._pending[1] += zd.square().mean(dim=(0, 2, 3))
            self._pending_batches += 1
        return rec_loss + self.mcfg.kl_weight * kl_loss, {"rec_loss": rec_loss.item(), "kl": kl_loss.item()}

    def after_step(self, step: int) -> None:
        # Every process calls after_step, so the reduction is safe here (export runs on rank 0 only).
        pending = self.accelerator.reduce(self._pending, reduction="sum")
        batches = self.accelerator.reduce(self._pending_batches, reduction="sum")
        if batches > 0:
            self.stats.update(pending[0] / batches, pending[1] / batches)
        self._pending.zero_()
        self._pending_batches.zero_()

    def checkpoint_objects(self):
        return {"latent_stats": self.stats}

    @torch.no_grad()
    def validate(self, step: int):
        if self._preview is None:
            return None
        x = self._preview.to(self.device, self.vae.dtype)
        rec = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        images = VaeImageProcessor().postprocess(torch.cat([x, rec]).float(), output_type="pil")
        from ldmkit.inference import image_grid

        return image_grid(images, len(x), row_labels=["original", "reconstruction"])

    def export(self, out_dir: Path) -> None:
        vae = self.vae
        if self.stats.steps:
            summary = self.stats.summary()
            vae.register_to_config(scaling_factor=summary["scaling_factor"])
        else:
            summary = {"scaling_factor": vae.config.scaling_factor, "steps": 0}
            logger.warning("no training step seen: keeping scaling_factor %s", vae.config.scaling_factor)
        vae.save_pretrained(out_dir)
        (Path(out_dir) / "vae_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("exported VAE to %s (scaling_factor %.5f)", out_dir, summary["scaling_factor"])
