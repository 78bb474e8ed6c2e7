"""ldmkit.diffusion.lcm against diffusers' own schedulers and pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from ldmkit.diffusion import lcm

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _ddim(prediction_type: str, n: int) -> DDIMScheduler:
    s = DDIMScheduler(
        **SD_SCHEDULE,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
    )
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("n", [50, 25, 20, 10, 1])
def test_ddim_timesteps_match_ddim_trailing(n):
    ours = lcm.ddim_timesteps(1000, n)
    assert torch.equal(ours, _ddim("epsilon", n).timesteps.flip(0))
    if n == 50:
        assert ours.tolist() == list(range(19, 1000, 20))


@pytest.mark.parametrize("n", [50, 30, 7])
def test_ddim_timesteps_match_lcm_origin_grid(n):
    s = LCMScheduler(**SD_SCHEDULE, original_inference_steps=n)
    s.set_timesteps(n)  # with num_inference_steps == N the schedule is the whole origin grid, reversed
    assert torch.equal(lcm.ddim_timesteps(1000, n), s.timesteps.flip(0))


def test_ddim_timesteps_rejects_bad_n():
    with pytest.raises(ValueError):
        lcm.ddim_timesteps(1000, 0)
    with pytest.raises(ValueError):
        lcm.ddim_timesteps(1000, 1001)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_origin_noise_and_ddim_step_match_ddim_scheduler(prediction_type):
    n = 50
    sched = _ddim(prediction_type, n)
    grid = lcm.ddim_timesteps(1000, n)
    alpha_prev = lcm.ddim_alpha_prev(sched.alphas_cumprod, grid)
    g = torch.Generator().manual_seed(0)
    for index in [0, 1, 17, n - 1]:
        t = int(grid[index])
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=0.0)
        ts = torch.full((2,), t, dtype=torch.long)
        x0 = lcm.predicted_origin(out, ts, x, prediction_type, sched.alphas_cumprod)
        eps = lcm.predicted_noise(out, ts, x, prediction_type, sched.alphas_cumprod)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        prev = lcm.ddim_step(x0, eps, alpha_prev[torch.full((2,), index)])
        torch.testing.assert_close(prev, ref.prev_sample, rtol=1e-4, atol=1e-4)
        # x_t is recovered from (x0, eps) on the forward process
        a = sched.alphas_cumprod[t]
        torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, x, rtol=1e-4, atol=1e-4)


def test_predictions_are_per_sample():
    sched = DDPMScheduler(**SD_SCHEDULE)
    x, out = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ts = torch.tensor([5, 500, 999])
    x0 = lcm.predicted_origin(out, ts, x, "epsilon", sched.alphas_cumprod)
    for i, t in enumerate(ts.tolist()):
        a = sched.alphas_cumprod[t]
        torch.testing.assert_close(x0[i], (x[i] - (1 - a).sqrt() * out[i]) / a.sqrt())
    with pytest.raises(ValueError):
        lcm.predicted_origin(out, ts, x, "flow", sched.alphas_cumprod)


@pytest.mark.parametrize("scaling", [10.0, 5.0, 1.0])
def test_boundary_scalings_match_lcm_scheduler(scaling):
    s = LCMScheduler(**SD_SCHEDULE, timestep_scaling=scaling)
    ts = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = lcm.scalings_for_boundary_conditions(ts, timestep_scaling=scaling)
    for i, t in enumerate(ts.tolist()):
        ref_skip, ref_out = s.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-6, abs=1e-9)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-6, abs=1e-9)
    assert c_skip[0] == 1 and c_out[0] == 0  # boundary condition f(x, 0) = x


@pytest.mark.parametrize("dim", [256, 512, 7])
def test_guidance_scale_embedding_matches_pipeline(dim):
    w = torch.tensor([0.0, 1.0, 4.5, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = lcm.guidance_scale_embedding(w, dim)
    assert ours.shape == (4, dim)
    torch.testing.assert_close(ours, ref)


def test_pseudo_huber():
    pred, target = torch.tensor([0.0, 1.0, -3.0]), torch.tensor([0.0, 0.0, 1.0])
    c = 0.001
    expected = np.mean([0.0, np.sqrt(1 + c**2) - c, np.sqrt(16 + c**2) - c])
    assert lcm.pseudo_huber(pred, target, c).item() == pytest.approx(expected, rel=1e-6)
    # large c: quadratic, ~ mse / (2c); tiny c: ~ L1
    big = lcm.pseudo_huber(pred, target, 100.0).item()
    assert big == pytest.approx(torch.mean((pred - target) ** 2).item() / 200, rel=1e-3)
    assert lcm.pseudo_huber(pred.half(), target.half(), c).dtype == torch.float32


def test_lcm_scheduler_four_steps_and_denoised_by_hand():
    ddpm = DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon")
    s = lcm.lcm_scheduler(ddpm.config, original_inference_steps=50, timestep_scaling=10.0)
    assert isinstance(s, LCMScheduler)
    assert s.config.original_inference_steps == 50 and s.config.timestep_scaling == 10.0
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in s.timesteps.tolist():
        out = torch.randn(2, 4, 8, 8, generator=g)
        step = s.step(out, t, x, generator=torch.Generator().manual_seed(1))
        ts = torch.full((2,), t)
        x0 = lcm.predicted_origin(out, ts, x, "epsilon", s.alphas_cumprod)
        c_skip, c_out = lcm.scalings_for_boundary_conditions(ts, timestep_scaling=10.0)
        by_hand = lcm.append_dims(c_out, 4) * x0 + lcm.append_dims(c_skip, 4) * x
        torch.testing.assert_close(step.denoised, by_hand, rtol=1e-5, atol=1e-5)
        x = step.prev_sample


@pytest.mark.parametrize("prediction_type,scaling", [("epsilon", 10.0), ("v_prediction", 5.0)])
def test_consistency_function_is_lcm_scheduler_denoised(prediction_type, scaling):
    ddpm = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    s = lcm.lcm_scheduler(ddpm.config, original_inference_steps=50, timestep_scaling=scaling)
    s.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in s.timesteps.tolist():
        out = torch.randn(2, 4, 8, 8, generator=g)
        step = s.step(out, t, x, generator=torch.Generator().manual_seed(1))
        f = lcm.consistency_function(out, x, torch.full((2,), t), prediction_type, s.alphas_cumprod, scaling)
        torch.testing.assert_close(f, step.denoised, rtol=1e-5, atol=1e-5)
        x = step.prev_sample
    # f(x, 0) = x: the boundary condition.
    torch.testing.assert_close(
        lcm.consistency_function(out, x, torch.zeros(2, dtype=torch.long), prediction_type, s.alphas_cumprod, scaling),
        x,
    )


@pytest.mark.parametrize("n,scaling", [(25, 5.0), (50, 10.0), (100, 20.0)])
def test_lcm_scheduler_carries_run_settings(n, scaling):
    s = lcm.lcm_scheduler(DDPMScheduler(**SD_SCHEDULE).config, original_inference_steps=n, timestep_scaling=scaling)
    grid = lcm.ddim_timesteps(1000, n).flip(0)
    for steps in (1, 2, 4, 8):
        s.set_timesteps(steps)
        idx = np.floor(np.linspace(0, n, steps, endpoint=False)).astype(np.int64)
        assert s.timesteps.tolist() == grid[idx].tolist()
    assert s.get_scalings_for_boundary_condition_discrete(259)[1] == pytest.approx(
        lcm.scalings_for_boundary_conditions(259, timestep_scaling=scaling)[1].item(), rel=1e-6
    )


def test_lcm_scheduler_overrides_and_defaults():
    # a folder config without clip_sample / prediction_type: LCMScheduler's defaults, not DDPM's clip_sample=True
    ddpm = DDPMScheduler.from_config({**SD_SCHEDULE, "skip_prk_steps": True})
    s = lcm.lcm_scheduler(ddpm.config, 50, 10.0, prediction_type="v_prediction")
    assert s.config.clip_sample is False and s.config.prediction_type == "v_prediction"
    assert "skip_prk_steps" not in s.config
