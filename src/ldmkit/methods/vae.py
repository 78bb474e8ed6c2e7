"""``vae``: train a KL autoencoder (diffusers AutoencoderKL) from scratch, or fine-tune one.

Objective: Rombach et al. 2022 (LDM), ``ldm/modules/losses/contperceptual.py`` ``LPIPSWithDiscriminator``
(without its learned output log-variance, which starts at 0 and only rescales the reconstruction term):

- reconstruction: per-pixel L1 or L2 of a posterior sample, plus ``perceptual_weight`` times a perceptual
  distance when ``lpips_weights`` names a local network file (off otherwise: nothing downloads);
- ``kl_weight`` times the per-sample KL to N(0, I);
- from step ``disc_start`` on, an adversarial term: a PatchGAN discriminator (models/discriminator.py)
  trained with the hinge (or vanilla) loss, and the generator term ``-mean(D(reconstruction))`` weighted by
  ``disc_weight`` times LDM's adaptive weight ||grad rec|| / (||grad gan|| + 1e-4), both gradients taken at
  the decoder's last layer, clamped to [0, 1e4] and not differentiated (Esser et al. 2021, VQGAN, eq. 7).

LDM sums the reconstruction over the pixels of a sample; here every term is divided by the number of pixel
values instead, so ``kl_weight`` and ``perceptual_weight`` mean what LDM's do (1e-6 and 1.0 in SD's VAE),
and the adaptive weight, a ratio of gradients, absorbs the scale of the generator term.

The export is a bare diffusers VAE folder whose ``scaling_factor`` is 1/std of the latents seen in the
last training steps (an exponential moving average of their first two moments, bias-corrected, summed
over all processes), as SD's 0.18215 was measured; the numbers also go to ``vae_stats.json``. The
discriminator is a training aid: it lives in the checkpoints, not in the export.
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
from ldmkit.methods.base import Method, StepCounter
from ldmkit.methods.configs import VAEConfig  # noqa: F401 (the configs import without torch: --help)
from ldmkit.models.discriminator import PatchDiscriminator
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

    def __init__(self, vae: AutoencoderKL, train_encoder: bool = True):
        super().__init__()
        self.vae = vae
        self.train_encoder = train_encoder
        if not train_encoder:  # decoder-only fine-tuning: the latent space is frozen
            for part in (vae.encoder, vae.quant_conv):
                if part is not None:
                    part.requires_grad_(False)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # (B, C, h, w)
        return self.vae.decode(z).sample, z, posterior.kl()  # (B, 3, H, W), (B, C, h, w), (B,)

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()


class DiscriminatorStep(nn.Module):
    """The discriminator on real images and on reconstructions, in one ``forward`` (one DDP call per step).
    The two batches run separately, as in LDM, so BatchNorm never mixes real and reconstructed images."""

    def __init__(self, disc: PatchDiscriminator):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.disc(real), self.disc(fake)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """LDM's discriminator hinge loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(rec)))."""
    return 0.5 * (torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN's discriminator loss in LDM's form: 0.5 (mean softplus(-D(x)) + mean softplus(D(rec)))."""
    return 0.5 * (nn.functional.softplus(-logits_real).mean() + nn.functional.softplus(logits_fake).mean())


def adaptive_weight(rec_grad: torch.Tensor, gan_grad: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance of the generator term: ||grad rec|| / (||grad gan|| + 1e-4), clamped to [0, max_weight],
    given both losses' gradients at the decoder's last layer; a constant (no gradient flows through it)."""
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def _load_perceptual(path: str, device: torch.device) -> torch.jit.ScriptModule:
    try:
        net = torch.jit.load(path, map_location=device)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"method.lpips_weights: {path} is not a TorchScript module ({first})") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


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
    label, title = "VAE", "VAE (AutoencoderKL)"
    tags = ("vae", "autoencoder")

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
        self.from_scratch = cfg.model.vae is None and not cfg.model.pretrained
        self.recompute = m.recompute_scaling_factor if m.recompute_scaling_factor is not None else self.from_scratch
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if cfg.data.resolution % self.factor:
            raise UserError(f"data.resolution={cfg.data.resolution} is not a multiple of the VAE factor {self.factor}")
        self.net = AutoencoderStep(vae.to(self.device).train(), m.train_encoder)
        self.perceptual = _load_perceptual(m.lpips_weights, self.device) if m.perceptual_weight else None
        # The discriminator is trained by the loop's one optimizer, next to the autoencoder. AdamW keeps
        # its state per parameter, so one AdamW over both is two AdamWs with the same learning rate and
        # betas; the loss below hands each module only its own gradient (the generator term reaches the
        # discriminator through detached weights, the discriminator's loss sees detached reconstructions),
        # so one backward and one step update both at once. That keeps the loop, DDP, the checkpoint (the
        # discriminator's weights and Adam state travel with the autoencoder's) and exact resume as they
        # are, with no second optimizer to thread through them. Differences from LDM's two optimizers that
        # take turns: both modules step on the same batch's forward pass (simultaneous rather than
        # alternating updates) and share train.learning_rate, the LR schedule and betas;
        # train.max_grad_norm clips each module's gradient by its own norm (clip_groups), as two
        # optimizers would, so the discriminator's large early gradients do not shrink the autoencoder's.
        self.disc = None
        if m.disc_weight > 0:
            disc = PatchDiscriminator(3, m.disc_channels, m.disc_layers, m.disc_norm)
            self.disc = DiscriminatorStep(disc.to(self.device).train())
            self.trainable_names = ("net", "disc")
            self.counter = StepCounter()
            self._d_loss = hinge_d_loss if m.disc_loss == "hinge" else vanilla_d_loss
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
        logs = {"rec_loss": rec_loss.item(), "kl": kl_loss.item()}
        nll = rec_loss
        if self.perceptual is not None:
            # mean over samples (and pixels, for a per-pixel map) = LDM's per-sample distance added to every
            # pixel's reconstruction error, divided by the pixel values like the rest
            p_loss = self.perceptual(x.float(), rec.float()).float().mean()
            nll = nll + self.mcfg.perceptual_weight * p_loss
            logs["p_loss"] = p_loss.item()
        loss = nll + self.mcfg.kl_weight * kl_loss
        if self.disc is not None:
            gan, gan_logs = self._adversarial(x.float(), rec.float(), nll)
            loss = loss + gan
            logs.update(gan_logs)
        with torch.no_grad():
            zd = z.detach().double()
            self._pending[0] += zd.mean(dim=(0, 2, 3))
            self._pending[1] += zd.square().mean(dim=(0, 2, 3))
            self._pending_batches += 1
        return loss, logs

    def _adversarial(self, x: torch.Tensor, rec: torch.Tensor, nll: torch.Tensor):
        """The generator term (adaptive weight x disc_weight x -mean D(rec)) plus the discriminator's loss,
        from step disc_start on (before it the discriminator is not run, so it does not train either)."""
        if self.counter.step < self.mcfg.disc_start:
            zero = {"g_loss": 0.0, "d_loss": 0.0, "d_weight": 0.0, "disc_active": 0.0}
            return torch.zeros((), device=x.device), zero
        disc = self.unwrap(self.disc).disc
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        g_loss = -torch.func.functional_call(disc, frozen, (rec,)).mean()
        last = self.vae.decoder.conv_out.weight
        grads = [torch.autograd.grad(term, last, retain_graph=True)[0] for term in (nll, g_loss)]
        # The gradients of the global batch's losses (their mean over processes), so every process uses the
        # same weight, the one a single process would compute on the whole batch.
        grads = self.accelerator.reduce(torch.stack(grads), reduction="mean")
        d_weight = adaptive_weight(grads[0], grads[1]) * self.mcfg.disc_weight
        logits_real, logits_fake = self.disc(x, rec.detach())
        d_loss = self._d_loss(logits_real, logits_fake)
        logs = {
            "g_loss": g_loss.item(),
            "d_loss": d_loss.item(),
            "d_weight": d_weight.item(),
            "disc_active": 1.0,
            "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item(),
        }
        return d_weight * g_loss + d_loss, logs

    def after_step(self, step: int) -> None:
        # Every process calls after_step, so the reduction is safe here (export runs on rank 0 only).
        pending = self.accelerator.reduce(self._pending, reduction="sum")
        batches = self.accelerator.reduce(self._pending_batches, reduction="sum")
        if batches > 0:
            self.stats.update(pending[0] / batches, pending[1] / batches)
        self._pending.zero_()
        self._pending_batches.zero_()
        if self.disc is not None:
            self.counter.step = step

    def clip_groups(self):
        if self.disc is None:
            return [self.parameters()]
        return [list(self.net.parameters()), list(self.disc.parameters())]

    def checkpoint_objects(self):
        if self.disc is None:
            return {"latent_stats": self.stats}
        return {"latent_stats": self.stats, "gan_steps": self.counter}

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
        given = vae.config.scaling_factor
        if self.stats.steps:
            summary = self.stats.summary()
            summary["measured_scaling_factor"] = summary["scaling_factor"]
            if self.recompute:
                vae.register_to_config(scaling_factor=summary["scaling_factor"])
            else:
                summary["scaling_factor"] = given
                logger.info(
                    "keeping the VAE's scaling_factor %s (measured on this data: %.5f; "
                    "method.recompute_scaling_factor=true writes that instead)",
                    given,
                    summary["measured_scaling_factor"],
                )
        else:
            summary = {"scaling_factor": given, "steps": 0}
            logger.warning("no training step seen: keeping scaling_factor %s", given)
        vae.save_pretrained(out_dir)
        (Path(out_dir) / "vae_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("exported VAE to %s (scaling_factor %.5f)", out_dir, summary["scaling_factor"])
