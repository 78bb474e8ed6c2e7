"""DMD2 (dmd2_lora, dmd2) from rectified-flow teachers (tiny SD3 and FLUX.1-dev twins): the distribution-matching
gradient by hand on diffusers' flow sigmas (SD3: real score with CFG; FLUX.1-dev: w as its guidance input, one
pass), the fake score's and the classifier's losses decrease while the real score never changes, the export
loads in stock diffusers and samples at 1/2/4 steps at the generator's own timesteps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

from ldmkit.errors import UserError
from ldmkit.families.flux import pack, unpack
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.rng import SampleRNG

from helpers.lcm import count_lora_modules, fixed_batch, make_distill_method, train_steps
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

RES = 32
ARCHS = ("sd3", "flux")


def make(arch: str, request, tmp_path, *extra: str, name: str = "dmd2_lora"):
    model = request.getfixturevalue(f"tiny_{arch}")
    return make_distill_method(name, model, tmp_path, *extra, res=RES), model


def diffusers_sigmas(config) -> torch.Tensor:
    """sigma_t for t = 0..999 from FlowMatchEulerDiscreteScheduler itself (FLUX: shifted by the training size's
    token count, as pipeline_flux.py's calculate_shift)."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    if sched.config.use_dynamic_shifting:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = sched.config
        mu = calculate_shift((RES // 8 // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sched.set_timesteps(sigmas=list(torch.linspace(1.0, 1 / 1000, 1000).numpy()), mu=mu)
    return sched.sigmas[:1000].flip(0).double()


class Swapped:
    """``model`` called with other tensors for some of its parameters (the fake score's LoRA)."""

    def __init__(self, model, tensors):
        self.model, self.tensors, self.config = model, tensors, model.config

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.tensors, args, kwargs, strict=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_flow_dmd_gradient_by_hand(arch, request, tmp_path):
    """A one-step generator turn without the GAN, transcribed: x0_G = eps - 1 * v_G(eps, sigma=1); x_t =
    (1 - s) x0_G + s eps'; x0 = x_t - s v for the real score (SD3: u + g (c - u); FLUX.1-dev: one pass with g
    as its guidance input) and the fake score; grad = (p_real - p_fake) / mean |p_real| in float64 (the
    reference's sd_guidance.py compute_distribution_matching_loss); loss 0.5 mse(x0_G, x0_G - grad)."""
    g = 3.5 if arch == "flux" else 3.0
    m, _ = make(arch, request, tmp_path, "--method.gen_cls_loss_weight=0", "--method.guidance_cls_loss_weight=0",
                f"--method.real_guidance_scale={g}")  # fmt: skip
    assert m.classifier is None and m.generator_steps.tolist() == [999]
    # a trained fake score: at its start it equals the generator's denoiser, and for FLUX.1-dev (same guidance
    # input as the real score) the real score too, where the gradient is zero
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in zip(m.fake.names, m.fake.weights):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = fixed_batch()
    loss, logs = m.loss(batch)
    loss.backward()
    ours = [p.grad.clone() for p in m._generator_parameters()]
    assert any(x.abs().sum() > 0 for x in ours)
    for p in m.parameters():
        p.grad = None

    fam, unet, embedded = m.family, m.unet, arch == "flux"
    sigmas = diffusers_sigmas(fam.noise_scheduler.config)
    assert sigmas[999] == 1.0
    rng = SampleRNG(batch["seed"])
    z = fam.latents(batch, rng)
    cond, uncond = fam.conditions(batch, resolution=RES)
    cond, uncond = ({k: v.float() for k, v in c.items()} for c in (cond, uncond))
    w = torch.full((2,), g) if embedded else None  # generator and fake score of FLUX.1-dev see g too

    def v(model, x, sigma, c, guidance=None):
        return fam.denoise(model, x, (sigma * 1000).float().reshape(-1), c, guidance).double()

    eps = rng.randn(*z.shape[1:])
    x0_g = eps - 1.0 * v(unet, eps, torch.ones(2), cond, w).float()
    t = rng.randint(20, 981)  # int(0.02 T) .. int(0.98 T), inclusive
    s = sigmas[t].reshape(-1, 1, 1, 1)
    noisy = ((1 - s) * x0_g.detach() + s * rng.randn(*z.shape[1:])).float()
    with torch.no_grad():
        v_fake = v(Swapped(unet, m.fake.tensors(detach=True)), noisy, s, cond, w)
        with adapters_disabled(unet):
            if embedded:
                v_real = v(unet, noisy, s, cond, w)
            else:
                v_c, v_u = v(unet, noisy, s, cond), v(unet, noisy, s, uncond)
                v_real = v_u + g * (v_c - v_u)
    x0_real, x0_fake = noisy.double() - s * v_real, noisy.double() - s * v_fake
    p_real, p_fake = x0_g.double() - x0_real, x0_g.double() - x0_fake
    grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    by_hand = 0.5 * F.mse_loss(x0_g.float(), (x0_g.double() - grad).detach().float(), reduction="mean")
    by_hand.backward()
    theirs = [p.grad for p in m._generator_parameters()]
    scale = max(x.abs().max().item() for x in theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * scale)
    assert logs["loss_dm"] == pytest.approx(by_hand.item(), rel=1e-4)


def test_fake_score_and_classifier_learn_and_the_real_score_never_changes(request, tmp_path):
    """SD3 with the GAN head on its middle block's image tokens; the real score (the base without adapters)
    keeps its weights and outputs bit for bit."""
    m, _ = make("sd3", request, tmp_path, "--method.dfake_gen_update_ratio=3")
    assert m.classifier is not None
    real = m.teacher_unet
    before = {n: p.detach().clone() for n, p in real.named_parameters()}
    x = torch.randn(1, 16, RES // 8, RES // 8)
    cond, _ = m.family.conditions(fixed_batch(1), resolution=RES)
    out_before = m.family.denoise(real, x, torch.tensor([500.0]), cond).detach()
    opt = torch.optim.AdamW(m.param_groups(), lr=3e-3, weight_decay=0.0)
    logs = []
    for step in range(12):
        loss, log = m.loss(fixed_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(step + 1)
        logs.append(log)
    fake = [log["loss_fake"] for log in logs]
    cls = [log["guidance_cls_loss"] for log in logs]
    assert sum(fake[-4:]) < sum(fake[:4]), fake
    assert sum(cls[-4:]) < sum(cls[:4]), cls
    assert sum(log["generator_turn"] for log in logs) == 4  # steps 0, 3, 6, 9
    for n, p in real.named_parameters():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(m.family.denoise(real, x, torch.tensor([500.0]), cond), out_before)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_stock_diffusers_and_samples_at_the_generators_timesteps(arch, request, tmp_path):
    """A 4-step generator (backward simulation): the stock pipeline with the exported FlowMatchLCMScheduler
    visits its timesteps at 4 steps and subsets of them at 1 and 2, and at 1 step returns the generator's x0."""
    m, model = make(arch, request, tmp_path, "--method.num_denoising_steps=4", "--method.backward_simulation=true",
                    "--method.dfake_gen_update_ratio=1")  # fmt: skip
    train_steps(m, fixed_batch(), 2, 1e-3)
    export = tmp_path / "export"
    m.export(export)
    record = m.sampling_record()
    record.save(export)
    assert record.scheduler == "FlowMatchLCMScheduler" and record.steps == 4
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(export))
    assert count_lora_modules(pipe.transformer) == count_lora_modules(m.unet) > 0
    pipe.scheduler = FlowMatchLCMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    seen: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(float(kw["timestep"].flatten()[0])), with_kwargs=True
    )
    trained = m.schedule.timestep(m.generator_steps).tolist()
    scale = 1000.0 if arch == "flux" else 1.0  # FluxPipeline passes timestep / 1000
    for steps in (1, 2, 4):
        seen.clear()
        latents = pipe(
            "a red circle",
            num_inference_steps=steps,
            guidance_scale=record.guidance,
            height=RES,
            width=RES,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert bool(torch.isfinite(latents).all())
        assert len(seen) == steps
        for t in seen:  # every visited timestep is one the generator was trained at (within one grid index)
            assert min(abs(t * scale - u) for u in trained) < 1.0, (t, trained)
    hook.remove()
    assert seen[0] * scale == pytest.approx(1000.0)
    # one step from given noise: the pipeline's sample is the generator's x0 = eps - v(eps, sigma = 1)
    noise = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(1))
    cond, _ = m.family.conditions(fixed_batch(1), resolution=RES)
    t = m.generator_steps[:1]
    with torch.no_grad():
        ours = m._x0(m.unet, noise, t, cond, m._guidance_input(t))
    theirs = pipe(
        fixed_batch(1)["captions"][0],
        num_inference_steps=1,
        guidance_scale=record.guidance,
        height=RES,
        width=RES,
        latents=pack(noise) if arch == "flux" else noise,
        output_type="latent",
    ).images
    theirs = unpack(theirs, RES // 8, RES // 8) if arch == "flux" else theirs
    torch.testing.assert_close(theirs.float(), ours, rtol=1e-4, atol=1e-4)


def test_full_dmd2_on_a_flow_teacher_trains_and_exports_a_pipeline(request, tmp_path):
    from ldmkit.methods import load_config

    m, _ = make("sd3", request, tmp_path, name="dmd2")
    assert m.unet is not m.fake and m.teacher_unet is not m.unet and m.classifier is not None
    before = {n: p.detach().clone() for n, p in m.teacher_unet.named_parameters()}
    train_steps(m, fixed_batch(), 2, 1e-4)
    assert all(torch.equal(p, before[n]) for n, p in m.teacher_unet.named_parameters())
    m.export(tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler)
    with pytest.raises(UserError, match="sampler_grid sets LCMScheduler's grid"):
        make("sd3", request, tmp_path / "grid", "--method.num_denoising_steps=2", "--method.sampler_grid=4")
    for arch in ARCHS:  # the debug twins are valid configs for their families
        cfg = load_config(f"dmd2_lora/debug_{arch}", [f"--model.pretrained={request.getfixturevalue(f'tiny_{arch}')}"])
        assert cfg.model.family == arch and cfg.method.num_denoising_steps == 4
