"""The rectified-flow fine-tuning loss of SD3 and FLUX.1, as diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py
and train_dreambooth_lora_flux.py train them (the SD3 paper's timestep densities and loss weights: Esser et al. 2024,
arXiv:2403.03206, section 3.1; ``diffusers.training_utils.compute_density_for_timestep_sampling`` and
``compute_loss_weighting_for_sd3``).

Per sample: u ~ the density of ``weighting_scheme`` on [0, 1); the scheduler's training index i = floor(u T) into its
descending sigmas (sigma = 1 - i / T, shifted); x_t = (1 - sigma) x_0 + sigma eps; the transformer predicts the velocity,
target eps - x_0; loss = weight(sigma) * MSE. "logit_normal" and "mode" shape the density of u (weight 1), "sigma_sqrt"
and "cosmap" sample u uniformly and weight the loss instead, "none" is uniform and unweighted.

Everything here takes the random draws as arguments, so the method draws them per sample (``ldmkit.rng.SampleRNG``)
and tests can feed the same draws to diffusers' helpers.
"""

from __future__ import annotations

import math

import torch

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
"""diffusers' ``--weighting_scheme`` choices (default "none")."""

DEFAULT_GUIDANCE = 3.5
"""The guidance input of a guidance-distilled transformer (FLUX.1-dev) while training: train_dreambooth_lora_flux.py's
``--guidance_scale`` default, and FluxPipeline's."""


def draws_normal(weighting_scheme: str) -> bool:
    """Whether u comes from a standard normal draw (logit_normal) rather than a uniform one on [0, 1)."""
    return weighting_scheme == "logit_normal"


def timestep_density(
    weighting_scheme: str, draw: torch.Tensor, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
) -> torch.Tensor:
    """u in [0, 1] [B] from ``draw`` [B] (standard normal for logit_normal, else uniform on [0, 1)), as
    ``compute_density_for_timestep_sampling``: logit_normal sigmoid(m + s z); mode 1 - u - c (cos^2(pi u / 2) - 1 + u)
    (SD3 paper eq. 20, heavier in the middle for c > 0); otherwise u itself. u near 1 = much noise."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"unknown weighting_scheme {weighting_scheme!r} ({', '.join(WEIGHTING_SCHEMES)})")
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * draw)
    if weighting_scheme == "mode":
        return 1 - draw - mode_scale * (torch.cos(math.pi * draw / 2) ** 2 - 1 + draw)
    return draw


def train_index(u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The ascending index t [B] (sigma_t = (t + 1) / T shifted, ``ldmkit.diffusion.schedule``) of the scripts'
    ``indices = (u * T).long()`` into the scheduler's descending ``sigmas`` (t = T - 1 - i). i is clamped to T - 1:
    u can reach 1.0 (a float32 sigmoid of a large draw, or mode's u at 0), where the scripts would index past the end."""
    i = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return num_train_timesteps - 1 - i


def loss_weighting(weighting_scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights [B] of ``compute_loss_weighting_for_sd3``: sigma_sqrt 1 / sigma^2; cosmap
    2 / (pi (1 - 2 sigma + 2 sigma^2)); 1 for the others (their density already does the weighting)."""
    if weighting_scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of x_t = (1 - sigma) x_0 + sigma eps along sigma: eps - x_0 (the scripts' ``noise - model_input``)."""
    return noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MSE of each sample in fp32, [B]; times the sample's weight it is the scripts' per-sample mean of
    weight * (pred - target)^2 (one weight per sample)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
