"""LCM-LoRA from rectified-flow teachers (tiny SD3 and FLUX.1-dev twins): Algorithm 1 on the flow schedule by
hand, the loss decreases, the export loads in stock diffusers with every module adapted and samples with
FlowMatchLCMScheduler at 1/2/4/8 steps, and a re-run resumes exactly. TCD, PCM and full LCD on flows:
tests/test_flow_tcd_pcm.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

from ldmkit.diffusion import lcm
from ldmkit.families.flux import pack, unpack  # noqa: F401 (the family's packing, used by denoise)
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.rng import SampleRNG

from helpers.lcm import count_lora_modules, fixed_batch, make_distill_method, train_steps
from helpers.runs import assert_debug_recipe_resumes
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

RES = 32
ARCHS = ("sd3", "flux")


def make(arch: str, request, tmp_path, *extra: str):
    model = request.getfixturevalue(f"tiny_{arch}")
    return make_distill_method("lcm_lora", model, tmp_path, "--method.loss_type=huber", *extra, res=RES), model


def random_lora(method, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_algorithm_1_on_the_flow_schedule_by_hand(arch, request, tmp_path):
    """Steps 1-8 transcribed with diffusers' FlowMatchEulerDiscreteScheduler sigmas: x_t = (1 - s) x0 + s eps, the
    teacher's Euler step x_t + (s_n - s_{n+k}) v (SD3: CFG in the LCM form; FLUX.1-dev: w is its guidance input,
    one pass), and the consistency function x_t - s v of FlowMatchLCMScheduler."""
    m, _ = make(arch, request, tmp_path, "--method.plain_teacher=false")
    random_lora(m)
    batch = fixed_batch()
    loss, _ = m.loss(batch)

    fam, unet = m.family, m.unet
    sched = FlowMatchEulerDiscreteScheduler.from_config(fam.noise_scheduler.config)
    if sched.config.use_dynamic_shifting:  # FLUX: the shift of the training resolution's token count
        seq = (RES // 8 // 2) ** 2
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = sched.config
        mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sched.set_timesteps(sigmas=list(torch.linspace(1.0, 1 / 1000, 1000).numpy()), mu=mu)
    sigmas = sched.sigmas[:1000].flip(0)  # ascending by index t = 0..999
    rng = SampleRNG(batch["seed"])
    z = fam.latents(batch, rng)
    cond, uncond = fam.conditions(batch, resolution=RES)
    cond, uncond = ({k: v.float() for k, v in c.items()} for c in (cond, uncond))
    index = rng.randint(0, 50)
    t_start = m.ddim_timesteps[index]
    t = (t_start - 20).clamp(min=0)
    s_start, s_n = sigmas[t_start].reshape(-1, 1, 1, 1), sigmas[t].reshape(-1, 1, 1, 1)
    z_start = (1 - s_start) * z + s_start * rng.randn(*z.shape[1:])
    w = m.w_min + (m.mcfg.w_max - m.w_min) * rng.rand()
    embedded = arch == "flux"
    g = w if embedded else None

    def v(model, x, sigma, c, guidance=None):
        return fam.denoise(model, x, sigma.reshape(-1) * 1000, c, guidance)

    student = z_start - s_start * v(unet, z_start, s_start, cond, g)
    with torch.no_grad():
        with adapters_disabled(unet):
            if embedded:
                v_hat = v(unet, z_start, s_start, cond, w)
            else:
                v_c, v_u = v(unet, z_start, s_start, cond), v(unet, z_start, s_start, uncond)
                v_hat = v_c + lcm.append_dims(w, 4) * (v_c - v_u)  # CFG on v = CFG on x0 and eps (linear)
        z_prev = z_start + (s_n - s_start) * v_hat
        target = z_prev - s_n * v(unet, z_prev, s_n, cond, g)
    torch.testing.assert_close(loss, lcm.pseudo_huber(student, target, 0.001), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases_and_the_export_loads_in_stock_diffusers(arch, request, tmp_path):
    m, model = make(arch, request, tmp_path)
    losses = train_steps(m, fixed_batch(), 20, 1e-3)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    export = tmp_path / "export"
    m.export(export)
    m.sampling_record().save(export)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(export))
    assert count_lora_modules(pipe.transformer) == count_lora_modules(m.unet) > 0  # every module adapted
    x = torch.randn(1, 16, RES // 8, RES // 8)
    cond, _ = m.family.conditions(fixed_batch(1), resolution=RES)
    t = torch.tensor([500.0])
    g = torch.tensor([3.5]) if arch == "flux" else None
    with torch.no_grad():
        ours = m.family.denoise(m.unet, x, t, cond, g)
        theirs = m.family.denoise(pipe.transformer, x, t, cond, g)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    pipe.scheduler = FlowMatchLCMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4, 8):
        image = pipe(
            "a red circle",
            num_inference_steps=steps,
            guidance_scale=m.sampling_record().guidance,
            height=RES,
            width=RES,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert image.shape == (1, RES, RES, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_debug_recipe_resumes_exactly(arch, request, shapes_folder, tmp_path):
    assert_debug_recipe_resumes("lcm_lora", arch, request.getfixturevalue(f"tiny_{arch}"), shapes_folder, tmp_path)
