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

On a rectified flow (SD3, FLUX.1; x_s = (1 - s) x0 + s eps, diffusion/schedule.py) the trajectory function is the
same formula (an Euler step of the flow), and the stochastic sampling step becomes ``flow_gamma_step``: predict
x0 and eps at sigma, move along the straight path to s' = (1 - gamma) s, re-noise forward from s' to s. No stock
diffusers scheduler does this (``FlowMatchEulerDiscreteScheduler`` is gamma 0, ``FlowMatchLCMScheduler`` and
the Euler scheduler's ``stochastic_sampling`` are gamma 1), so ldmkit samples flow TCD models with its own
``FlowMatchTCDScheduler`` (tested against both ends in tests/test_flow_tcd_pcm.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, TCDScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ldmkit.diffusion.lcm import append_dims, predicted_noise, predicted_origin
from ldmkit.diffusion.schedule import flow_noise_travel

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


# ------------------------------------------------------------------------------------------- rectified flow
def flow_gamma_step(
    x0: torch.Tensor, eps: torch.Tensor, sigma_next: torch.Tensor | float, gamma: float, noise: torch.Tensor
) -> torch.Tensor:
    """TCD's strategic stochastic step (paper Algorithm 4; ``TCDScheduler.step`` with eta = gamma) on a rectified
    flow: x_{s'} = (1 - s') x0 + s' eps at s' = (1 - gamma) s along the straight path through the prediction, then
    forward noising from s' to s with fresh ``noise`` (``flow_noise_travel``). gamma 0: the deterministic Euler
    step to s; gamma 1: x0 re-noised to s (LCM's multistep sampling)."""
    sigma_next = torch.as_tensor(sigma_next, dtype=x0.dtype, device=x0.device)
    sigma_prime = (1 - gamma) * sigma_next
    x_prime = (1 - sigma_prime) * x0 + sigma_prime * eps
    return flow_noise_travel(x_prime, noise, sigma_prime, sigma_next)


class FlowMatchTCDScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler``'s sigmas (shift, dynamic shifting: the pipelines set them as for the
    Euler scheduler) with TCD's gamma step (``flow_gamma_step``). ldmkit's, since no stock diffusers flow scheduler
    has the step: exports save the Euler scheduler's config (exact at gamma 0) and their sampling record names
    this sampler and gamma (``ldmkit.inference.load_export`` builds it). ``gamma`` is an attribute, not config,
    so the config stays the stock one's. The re-noising draws come from ``generator`` when the pipeline passes one
    (the flow pipelines do not), else from the generators handed over by ``use_generators`` (ldmkit's
    ``generate_images``: the images' own seeds), else torch's global generator."""

    gamma: float = DEFAULT_GAMMA
    _generators = None

    @classmethod
    def with_gamma(cls, config, gamma: float) -> FlowMatchTCDScheduler:
        scheduler = cls.from_config(config)
        scheduler.gamma = float(gamma)
        return scheduler

    def use_generators(self, generators) -> None:
        self._generators = generators

    def step(self, model_output, timestep, sample, *args, generator=None, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        x = sample.to(torch.float32)
        v = model_output.to(torch.float32)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0, eps = x - sigma * v, x + (1 - sigma) * v  # the flow's x0 and eps (diffusion/schedule.py)
        gens = generator if generator is not None else self._generators
        if isinstance(gens, list) and len(gens) != x.shape[0]:
            gens = gens[0]  # a batch laid out otherwise: one stream
        noise = randn_tensor(x.shape, generator=gens, device=x.device, dtype=x.dtype)
        prev = flow_gamma_step(x0, eps, sigma_next, self.gamma, noise).to(model_output.dtype)
        self._step_index += 1
        return (prev,) if not return_dict else _output(prev)


def _output(prev: torch.Tensor) -> FlowMatchEulerDiscreteSchedulerOutput:
    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
