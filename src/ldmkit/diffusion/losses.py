"""Denoising targets and min-SNR loss weights for fine-tuning (diffusers examples/text_to_image/train_text_to_image.py; Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")."""

from __future__ import annotations

import torch


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network should predict for the scheduler's ``prediction_type``: the noise (epsilon) or
    the velocity v = alpha_t * noise - sigma_t * x0 (Salimans & Ho 2022, eq. 9; ``get_velocity``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556), shape (B,).

    Min-SNR weights the x0 MSE by min(SNR, gamma). The epsilon MSE equals SNR times the x0 MSE and the
    v MSE equals (SNR + 1) times it, so their weights are min(SNR, gamma) / SNR and
    min(SNR, gamma) / (SNR + 1) (as in diffusers' train_text_to_image.py). Every sample gets the weight
    of its own timestep (one reference takes the first sample's weight for the whole batch).
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)  # (B,)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
