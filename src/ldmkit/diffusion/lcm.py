"""Pure Latent Consistency Distillation math (LCM paper, Luo et al. 2023, arXiv:2310.04378).

Each function is small, stateless and tested against diffusers' own implementation
(tests/test_lcm_math.py): the DDIM solver grid against ``DDIMScheduler(timestep_spacing="trailing")``,
x0/eps conversions against ``DDIMScheduler.step``, boundary scalings against
``LCMScheduler.get_scalings_for_boundary_condition_discrete``, the guidance embedding against
``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.

Symbols: T = num_train_timesteps, N = num_ddim_timesteps, k = T // N (skipping step),
alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers import LCMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-sample values [B] -> [B, 1, ..., 1] with ``ndim`` dims, to broadcast against a batch."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The DDIM solver grid t_i = round((i + 1) * k) - 1, i = 0..N-1 (ascending, int64): [19, 39, ..., 999] for N=50.

    Same grid as ``DDIMSolver`` of diffusers' examples/consistency_distillation scripts, the
    reversed ``DDIMScheduler(timestep_spacing="trailing").set_timesteps(N)`` and ``LCMScheduler``'s
    ``lcm_origin_timesteps``.
    """
    if not 0 < num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in 1..{num_train_timesteps}, got {num_ddim_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    return (torch.arange(1, num_ddim_timesteps + 1, dtype=torch.float64) * k).round().long() - 1


def ddim_alpha_prev(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod one grid point earlier: alpha_prev[i] = alphas_cumprod[t_{i-1}], alphas_cumprod[0] for i = 0.

    This is ``DDIMSolver.ddim_alpha_cumprods_prev`` of the diffusers LCD scripts, i.e. the
    ``alpha_prod_t_prev`` of ``DDIMScheduler.step`` with ``set_alpha_to_one=False``.
    """
    prev = torch.cat([timesteps.new_zeros(1), timesteps[:-1]])
    return alphas_cumprod[prev]


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0; Song et al. 2021, eq. 12): sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps.

    ``alpha_prev`` is per sample [B] (gathered from ``ddim_alpha_prev`` by grid index).
    """
    a = append_dims(alpha_prev, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def scalings_for_boundary_conditions(
    timesteps: torch.Tensor | float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary scalings (c_skip, c_out) at discrete timesteps (LCM paper eq. 9 / CM appendix C).

    c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2); with s = timestep_scaling
    c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x. Equals
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete`` when configured with the same
    ``timestep_scaling``.
    """
    t = torch.as_tensor(timesteps).float() * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    ac = alphas_cumprod.to(like.device)[timesteps.to(like.device)]
    alpha = append_dims(ac.sqrt(), like.ndim)
    sigma = append_dims((1 - ac).sqrt(), like.ndim)
    return alpha, sigma


def predicted_origin(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """x0 from a model output at x_t (``pred_original_sample`` of ``DDIMScheduler.step``).

    epsilon: (x_t - sigma_t eps) / alpha_t;  v_prediction: alpha_t x_t - sigma_t v;  sample: the output.
    """
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, sample)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def predicted_noise(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """eps from a model output at x_t (``pred_epsilon`` of ``DDIMScheduler.step``).

    epsilon: the output;  v_prediction: alpha_t v + sigma_t x_t;  sample: (x_t - alpha_t x0) / sigma_t.
    """
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, sample)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def consistency_function(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0(model_output, x_t, t) (LCM paper eq. 9).

    The one parameterisation used by distillation (student and target) and by sampling: it is the
    ``denoised`` of ``LCMScheduler.step`` configured with the same ``timestep_scaling``.
    """
    c_skip, c_out = (
        append_dims(c, sample.ndim)
        for c in scalings_for_boundary_conditions(timesteps, timestep_scaling=timestep_scaling)
    )
    return c_skip * sample + c_out * predicted_origin(model_output, timesteps, sample, prediction_type, alphas_cumprod)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 512, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales [B] -> [B, dim] (VDM, Kingma et al. 2021; LCM paper sec. 4.2).

    w is multiplied by 1000 and embedded as [sin, cos] with freq_j = exp(-log(10000) j / (half - 1)),
    zero-padded for odd dim: the same as diffusers' ``get_guidance_scale_embedding``, which is what the
    pipelines feed a UNet with ``time_cond_proj_dim`` (with ``guidance_scale - 1`` as w).
    """
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D [B], got shape {tuple(w.shape)}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber loss mean(sqrt((pred - target)^2 + c^2) - c) in fp32 (Song & Dhariwal 2023, sec. 3.3)."""
    diff = pred.float() - target.float()
    return torch.mean(torch.sqrt(diff**2 + c**2) - c)


def lcm_scheduler(
    scheduler_config: dict, original_inference_steps: int, timestep_scaling: float, **overrides: Any
) -> LCMScheduler:
    """An ``LCMScheduler`` on the teacher's noise schedule carrying the run's N and s.

    Inference must use the same N (``original_inference_steps``) and s (``timestep_scaling``) as
    distillation, so every export writes them into the scheduler config (the references do not).
    ``overrides`` (e.g. prediction_type) win over the config.
    """
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    # Drop keys LCMScheduler does not take (SD folders carry those of the scheduler they were saved from);
    # keep private ones: ``_use_default_values`` makes from_config use LCMScheduler's own defaults there
    # (e.g. clip_sample=False rather than DDPMScheduler's True).
    config = {k: v for k, v in dict(scheduler_config).items() if k in accepted or k.startswith("_")}
    return LCMScheduler.from_config(
        config, original_inference_steps=original_inference_steps, timestep_scaling=timestep_scaling, **overrides
    )
