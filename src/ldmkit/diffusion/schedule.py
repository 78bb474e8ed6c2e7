"""The forward process a distillation runs on, for both model generations: DDPM's variance-preserving
schedule (SD1.x/2.x, SDXL, U-ViT) and rectified flow (SD3, FLUX.1).

Both are x_t = alpha_t x_0 + sigma_t eps on a discrete index t = 0..T-1 (the skipping-step grid of LCD is a
set of such indices); they differ in the two scalars and in what the network predicts:

- DDPM: alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]); the model takes t itself and
  predicts eps or v (``ldmkit.diffusion.lcm``; Ho et al. 2020, Salimans & Ho 2022).
- Rectified flow: alpha_t = 1 - sigma_t with sigma_t the shifted sigmas of ``FlowMatchEulerDiscreteScheduler``
  (sigma = (t + 1) / T, shifted by ``shift``: s sigma / (1 + (s - 1) sigma), or for FLUX's dynamic shifting by
  exp(mu) with mu from the image's token count, diffusers ``calculate_shift`` / ``time_shift``); the model takes
  sigma_t * T (the pipelines' ``scheduler.timesteps``) and predicts the velocity v = eps - x_0 (Liu et al. 2022;
  Esser et al. 2024, SD3 paper eq. 1-3), so x_0 = x_t - sigma_t v and eps = x_t + (1 - sigma_t) v.

With x_0 and eps from a prediction, one DDIM step to s, alpha_s x_0 + sigma_s eps, is on a flow schedule exactly
the Euler step x_t + (sigma_s - sigma_t) v of ``FlowMatchEulerDiscreteScheduler.step``, so LCD's teacher solver,
TCD's trajectory consistency function and PCM's phase map carry over unchanged (tests/test_flow_math.py checks
each against diffusers). Only the consistency function at the origin differs: LCM's boundary scalings
(c_skip, c_out) on DDPM, x_0 itself on a flow (what ``FlowMatchLCMScheduler.step`` samples with; f(x, 0) = x
holds since sigma_0 is ~0).

Two flow-only pieces: the teacher's second-order step (``heun_step``: Heun over the same sigmas, as
``FlowMatchHeunDiscreteScheduler`` and the PCM authors' SD3 scripts offer), and forward noising from one point of a
flow to a noisier one (``flow_noise_travel``), which TCD's stochastic sampling step needs (diffusion/tcd.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldmkit.diffusion import lcm
from ldmkit.diffusion.lcm import append_dims

FLOW = "flow"
"""prediction_type of a rectified-flow model (velocity)."""


def flow_sigmas(num_train_timesteps: int, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """sigma_t for t = 0..T-1, ascending: (t + 1) / T shifted, as ``FlowMatchEulerDiscreteScheduler`` trains (its
    ``sigmas``, read backwards). ``mu`` (dynamic shifting, FLUX): exp(mu) / (exp(mu) + 1 / sigma - 1) instead of
    the static ``shift``."""
    sigma = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    if mu is not None:
        sigma = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    else:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma.float()


def dynamic_shift_mu(image_seq_len: int, config) -> float:
    """mu of FLUX's resolution-dependent shift: linear in the image's token count between (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift), as diffusers' ``calculate_shift`` (pipeline_flux.py)."""
    x1, x2 = config["base_image_seq_len"], config["max_image_seq_len"]
    y1, y2 = config["base_shift"], config["max_shift"]
    m = (y2 - y1) / (x2 - x1)
    return image_seq_len * m + (y1 - m * x1)


def heun_step(
    sample: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """Heun's (improved Euler) step of the flow ODE dx/dsigma = v from sigma to sigma_next: the Euler step's
    end point is ``sample + (sigma_next - sigma) v``; ``v_next`` is the velocity predicted there, and the step
    uses their mean, x + (sigma_next - sigma) (v + v_next) / 2 (``FlowMatchHeunDiscreteScheduler.step``'s two
    calls). ``sigma`` / ``sigma_next`` broadcast against ``sample``."""
    return sample + (sigma_next - sigma) * 0.5 * (v + v_next)


def flow_noise_travel(
    sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor
) -> torch.Tensor:
    """Forward noising of a flow sample x_sigma to sigma_to >= sigma: with r = (1 - sigma_to) / (1 - sigma),
    x_to = r x_sigma + sqrt(sigma_to^2 - r^2 sigma^2) z. If x_sigma = (1 - sigma) x0 + sigma eps', x_to has the
    marginal (1 - sigma_to) x0 + sigma_to eps of the rectified-flow interpolation (its noise variance is
    r^2 sigma^2 + sigma_to^2 - r^2 sigma^2). The flow form of DDPM's sqrt(a_t / a_s) x_s + sqrt(1 - a_t / a_s) z
    (diffusion/pcm.py ``noise_travel``)."""
    r = (1 - sigma_to) / (1 - sigma)
    return r * sample + (sigma_to**2 - (r * sigma) ** 2).clamp(min=0).sqrt() * noise


@dataclass
class Schedule:
    """alpha_t, sigma_t and the model's timestep input for every index t = 0..T-1, and the prediction type."""

    alpha: torch.Tensor
    """[T] signal scale alpha_t."""
    sigma: torch.Tensor
    """[T] noise scale sigma_t."""
    model_t: torch.Tensor
    """[T] what the denoiser is called with at index t (DDPM: t; flow: sigma_t * T)."""
    prediction_type: str
    """epsilon | v_prediction | flow."""

    @classmethod
    def ddpm(cls, alphas_cumprod: torch.Tensor, prediction_type: str) -> Schedule:
        ac = alphas_cumprod.float()
        return cls(ac.sqrt(), (1 - ac).sqrt(), torch.arange(len(ac)), prediction_type)

    @classmethod
    def flow(cls, num_train_timesteps: int, shift: float = 1.0, mu: float | None = None) -> Schedule:
        sigma = flow_sigmas(num_train_timesteps, shift, mu)
        return cls(1 - sigma, sigma, sigma * num_train_timesteps, FLOW)

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == FLOW

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alpha)

    def to(self, device) -> Schedule:
        return Schedule(self.alpha.to(device), self.sigma.to(device), self.model_t.to(device), self.prediction_type)

    def scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) per sample, shaped to broadcast against ``like`` [B, ...]."""
        t = t.to(self.alpha.device)
        return append_dims(self.alpha[t], like.ndim).to(like), append_dims(self.sigma[t], like.ndim).to(like)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's timestep input at indices t [B]."""
        return self.model_t.to(t.device)[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps (DDPMScheduler.add_noise; FlowMatchEulerDiscreteScheduler.scale_noise)."""
        alpha, sigma = self.scales(t, x0)
        return alpha * x0 + sigma * noise

    point = add_noise
    """alpha_s x_0 + sigma_s eps: a DDIM step to s (on a flow: the Euler step), TCD's / PCM's f(x_t, t, s)."""

    def x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 from a prediction at x_t."""
        alpha, sigma = self.scales(t, x)
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha
        if self.prediction_type == "v_prediction":  # variance preserving: alpha^2 + sigma^2 = 1
            return alpha * x - sigma * out
        if self.prediction_type == FLOW:
            return x - sigma * out
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps from a prediction at x_t."""
        alpha, sigma = self.scales(t, x)
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            return alpha * out + sigma * x
        if self.prediction_type == FLOW:
            return x + alpha * out
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict at x_t = add_noise(x0, noise, t): eps, v = alpha eps - sigma x0
        (DDPMScheduler.get_velocity), or the flow velocity eps - x0."""
        if self.prediction_type == "epsilon":
            return noise
        alpha, sigma = self.scales(t, x0)
        if self.prediction_type == "v_prediction":
            return alpha * noise - sigma * x0
        if self.prediction_type == FLOW:
            return noise - x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def index_of(self, model_timesteps: torch.Tensor) -> torch.Tensor:
        """The indices t whose model timesteps are nearest to ``model_timesteps`` (a sampler's timesteps)."""
        diff = (self.model_t.to(model_timesteps.device)[None, :].float() - model_timesteps.float()[:, None]).abs()
        return diff.argmin(dim=1)

    def consistency(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, timestep_scaling: float) -> torch.Tensor:
        """LCM's consistency function f(x_t, t) -> x_0: c_skip(t) x_t + c_out(t) x_0 on DDPM (LCM paper eq. 9,
        ``LCMScheduler``); x_0 itself on a flow (``FlowMatchLCMScheduler.step``'s ``x0_pred``)."""
        x0 = self.x0(out, x, t)
        if self.is_flow:
            return x0
        c_skip, c_out = (
            append_dims(c, x.ndim).to(x) for c in lcm.scalings_for_boundary_conditions(t, 0.5, timestep_scaling)
        )
        return c_skip * x + c_out * x0

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The flow velocity v = eps - x0 of a (guided) prediction (the ODE's dx/dsigma)."""
        return eps - x0

    def heun(
        self, x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, t: torch.Tensor, s: torch.Tensor
    ) -> torch.Tensor:
        """Heun's step (``heun_step``) from index t to s on a flow; ``v_next`` is predicted at the Euler point."""
        if not self.is_flow:
            raise ValueError("heun steps are defined on a rectified-flow schedule only")
        return heun_step(x, v, v_next, self.scales(t, x)[1], self.scales(s, x)[1])

    def trajectory(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """TCD's f(x_t, t, s) = alpha_s x_0 + sigma_s eps; x_t itself where s == t (the boundary condition)."""
        x_s = self.point(self.x0(out, x, t), self.eps(out, x, t), s)
        same = append_dims(s.to(x.device) == t.to(x.device), x.ndim)
        return torch.where(same, x, x_s)


def pipeline_flow_timesteps(scheduler, steps: int, mu: float | None, linear_sigmas: bool) -> torch.Tensor:
    """The timesteps (sigma * T) a stock flow pipeline sets on ``scheduler`` (a FlowMatch* scheduler) for
    ``steps`` steps, so that a distilled model can be trained at exactly what it will be sampled at.
    ``linear_sigmas``: FluxPipeline's way, sigmas linspace(1, 1/K, K) passed in with ``mu`` (pipeline_flux.py
    ``__call__``, "Prepare timesteps"); otherwise StableDiffusion3Pipeline's, which lets the scheduler space its
    own sigma range (``set_timesteps(K)``) and passes ``mu`` only with dynamic shifting."""
    import numpy as np

    kwargs: dict = {"mu": mu} if mu is not None else {}
    if linear_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler.timesteps[:steps].float()
