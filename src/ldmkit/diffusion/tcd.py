"""Pure Trajectory Consistency Distillation math (TCD; Zheng et al. 2024, arXiv:2402.19159).

TCD replaces LCM's consistency function f(x_t, t) -> x_0 by a *trajectory* consistency function
f(x_t, t, s) -> x_s that maps to any earlier point s <= t of the same PF-ODE trajectory. Its
parameterisation is semi-linear (paper sec. 4.1, the first-order exponential integrator of the PF-ODE):

    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0_hat,   h = lambda_s - lambda_t,  lambda = log(alpha / sigma)

which, with eps_hat = (x_t - alpha_t x0_hat) / sigma_t, is the DDIM step x_s = alpha_s x0_hat + sigma_s eps_hat
(both forms are written out and compared in tests/test_tcd_pcm_math.py). It is what diffusers'
``TCDScheduler.step`` calls ``pred_noised_sample`` (src/diffusers/schedulers/scheduling_tcd.py), and
f(x_t, t, t) = x_t holds by construction, so no c_skip / c_out boundary scalings are needed.

Training samples the target point s per sample on the DDIM solver grid at or below t_n (``sample_end_timesteps``);
sampling is ``TCDScheduler`` with its stochastic parameter gamma (``eta`` of ``TCDScheduler.step``; paper
Algorithm 4, "strategic stochastic sampling"; gamma 0 is deterministic).

Symbols as in ``ldmkit.diffusion.lcm``: alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import TCDScheduler

from ldmkit.diffusion.lcm import append_dims, predicted_noise, predicted_origin

DEFAULT_GAMMA = 0.3
"""The paper's (and ``TCDScheduler.step``'s) default stochasticity gamma for sampling."""


def trajectory_consistency_function(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    end_timesteps: torch.Tensor,
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """f(x_t, t, s) = alpha_s x0_hat + sigma_s eps_hat: the point at time s of the trajectory through x_t.

    Per sample: ``timesteps`` t and ``end_timesteps`` s are [B] (s <= t). Where s == t the result is x_t
    itself (exactly, not up to rounding): the boundary condition of the consistency function.
    """
    x0 = predicted_origin(model_output, timesteps, sample, prediction_type, alphas_cumprod)
    eps = predicted_noise(model_output, timesteps, sample, prediction_type, alphas_cumprod)
    a_s = append_dims(alphas_cumprod.to(sample.device)[end_timesteps.to(sample.device)], sample.ndim)
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    same = append_dims((end_timesteps.to(sample.device) == timesteps.to(sample.device)), sample.ndim)
    return torch.where(same, sample, x_s)


def exponential_integrator_step(
    x0: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor, end_timesteps: torch.Tensor, alphas_cumprod
) -> torch.Tensor:
    """The paper's form of the same map (sec. 4.1): (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0_hat.

    Kept as the formula to test ``trajectory_consistency_function`` against; training uses the DDIM form.
    """
    ac = alphas_cumprod.to(sample.device)
    a_t, a_s = (append_dims(ac[t.to(sample.device)], sample.ndim) for t in (timesteps, end_timesteps))
    alpha_t, sigma_t, alpha_s, sigma_s = a_t.sqrt(), (1 - a_t).sqrt(), a_s.sqrt(), (1 - a_s).sqrt()
    h = torch.log(alpha_s / sigma_s) - torch.log(alpha_t / sigma_t)
    return sigma_s / sigma_t * sample - alpha_s * (torch.exp(-h) - 1.0) * x0


def sample_end_timesteps(index: torch.Tensor, ddim_timesteps: torch.Tensor, k: int, u: torch.Tensor) -> torch.Tensor:
    """TCD's target point s for a student at t_{n+k} = ddim_timesteps[index]: uniform over the solver grid
    points at or below t_n, {0, t_1, ..., t_n} with t_j = ddim_timesteps[j] - k clamped at 0 (index + 1 choices).

    ``u`` are uniform [0, 1) draws [B] (from the samples' own seeds). s = t_n gives the LCD target at t_n
    itself; s = 0 the LCM one.
    """
    end_index = torch.floor(u.to(index.device) * (index + 1)).long().clamp(max=index)
    return (ddim_timesteps[end_index] - k).clamp(min=0)


def tcd_scheduler(scheduler_config: dict, original_inference_steps: int, **overrides: Any) -> TCDScheduler:
    """A ``TCDScheduler`` on the teacher's noise schedule with the run's solver grid N
    (``original_inference_steps``): inference timesteps are taken from the same grid as in training.
    ``overrides`` (e.g. prediction_type) win over the config."""
    accepted = inspect.signature(TCDScheduler.__init__).parameters
    # As lcm.lcm_scheduler: drop keys TCDScheduler does not take; private keys make from_config use
    # TCDScheduler's own defaults where the saved config had none.
    config = {k: v for k, v in dict(scheduler_config).items() if k in accepted or k.startswith("_")}
    return TCDScheduler.from_config(config, original_inference_steps=original_inference_steps, **overrides)
