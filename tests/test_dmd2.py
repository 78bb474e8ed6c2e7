"""DMD2 (dmd2_lora, dmd2) on tiny SD1.5 teachers: the distribution-matching gradient against a line-by-line
transcription of the reference's loss, the fake score's and the classifier's losses decrease, the real score never
changes, the two-time-scale counter resumes, exports load in stock diffusers and sample at 1/2/4 steps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import LCMScheduler, StableDiffusionPipeline

from ldmkit.cli import main
from ldmkit.errors import UserError
from ldmkit.inference import read_sampling_record
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.methods.dmd2 import DMD2LoraMethod
from ldmkit.rng import SampleRNG

from helpers.lcm import count_lora_modules, fixed_batch, make_distill_method, train_steps, unet_inputs, unet_out
from helpers.runs import assert_debug_recipe_resumes
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

RES = 32


def make(model, out, *extra: str, name: str = "dmd2_lora"):
    small = ["--method.lora_rank=4"] if name == "dmd2_lora" else []
    return make_distill_method(name, model, out, *small, *extra, res=RES)


def reference_dm_loss(latents, pred_real_noise, pred_fake_noise, alphas_cumprod, timesteps, noisy_latents):
    """tianweiy/DMD2 main/sd_guidance.py compute_distribution_matching_loss, transcribed line by line (epsilon
    teacher): x0 from noise in float64 (main/utils.py get_x0_from_noise), grad normalised by mean |p_real|."""
    a = alphas_cumprod.double()[timesteps].reshape(-1, 1, 1, 1)
    pred_fake_image = (noisy_latents.double() - (1 - a).sqrt() * pred_fake_noise.double()) / a.sqrt()
    pred_real_image = (noisy_latents.double() - (1 - a).sqrt() * pred_real_noise.double()) / a.sqrt()
    p_real = latents - pred_real_image
    p_fake = latents - pred_fake_image
    grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
    grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(latents.float(), (latents - grad).detach().float(), reduction="mean")


def test_dmd_gradient_equals_the_reference_transcription(tiny_sd15, tmp_path):
    """A generator turn without the GAN: the generator's gradient is that of the reference's loss_dm alone."""
    m = make(tiny_sd15, tmp_path, "--method.gen_cls_loss_weight=0", "--method.guidance_cls_loss_weight=0")
    assert m.classifier is None and m.mcfg.num_denoising_steps == 1
    batch = fixed_batch()
    loss, logs = m.loss(batch)
    loss.backward()
    ours = [p.grad.clone() for p in m._generator_parameters()]
    assert any(g.abs().sum() > 0 for g in ours)
    for p in m.parameters():
        p.grad = None

    # by hand, the same draws in the same order
    unet, fam, ac = m.unet, m.family, fam_ac(m)
    rng = SampleRNG(batch["seed"])
    z = fam.latents(batch, rng)
    cond, uncond = fam.conditions(batch, resolution=RES)
    c, u = cond["prompt_embeds"].float(), uncond["prompt_embeds"].float()
    noise = rng.randn(*z.shape[1:])
    t999 = torch.full((2,), 999)
    a999 = ac[t999].reshape(-1, 1, 1, 1)
    x0_g = (noise - (1 - a999).sqrt() * unet(noise, t999, encoder_hidden_states=c).sample) / a999.sqrt()
    t = rng.randint(20, 981)  # int(0.02 T) .. int(0.98 T) inclusive
    a = ac[t].reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * x0_g.detach() + (1 - a).sqrt() * rng.randn(*z.shape[1:])
    with torch.no_grad():
        fake = torch.func.functional_call(unet, m.fake.tensors(detach=True), (noisy, t), {"encoder_hidden_states": c})
        with adapters_disabled(unet):
            real_c = unet(noisy, t, encoder_hidden_states=c).sample
            real_u = unet(noisy, t, encoder_hidden_states=u).sample
        pred_real = real_u + 1.75 * (real_c - real_u)  # the reference's predict_noise with CFG
    reference_dm_loss(x0_g, pred_real, fake.sample, ac, t, noisy).backward()
    theirs = [p.grad for p in m._generator_parameters()]
    scale = max(g.abs().max().item() for g in theirs)  # fp32 here, float64 x0 in the reference
    for a_, b_ in zip(ours, theirs):
        torch.testing.assert_close(a_, b_, rtol=1e-3, atol=1e-3 * scale)
    assert logs["loss_dm"] == pytest.approx(
        reference_dm_loss(x0_g, pred_real, fake.sample, ac, t, noisy).item(), rel=1e-4
    )


def fam_ac(m):
    return m.family.noise_scheduler.alphas_cumprod


def test_fake_score_and_classifier_learn_and_the_real_score_never_changes(tiny_sd15, tmp_path):
    m = make(tiny_sd15, tmp_path, "--method.dfake_gen_update_ratio=5")
    real_before = {n: p.detach().clone() for n, p in m.teacher_unet.named_parameters()}
    inputs = unet_inputs(m.teacher_unet)
    out_before = unet_out(m.teacher_unet, inputs)
    logs = []
    opt = torch.optim.AdamW(m.param_groups(), lr=3e-3, weight_decay=0.0)
    batch = fixed_batch()
    for step in range(30):
        loss, log = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(step + 1)
        logs.append(log)
    fake = [log["loss_fake"] for log in logs]
    cls = [log["guidance_cls_loss"] for log in logs]
    assert sum(fake[-5:]) < sum(fake[:5]), fake
    assert sum(cls[-5:]) < sum(cls[:5]), cls
    assert sum(log["generator_turn"] for log in logs) == 6  # steps 0, 5, ..., 25
    for n, p in m.teacher_unet.named_parameters():
        assert torch.equal(p, real_before[n]), n
    torch.testing.assert_close(unet_out(m.teacher_unet, inputs), out_before, rtol=0, atol=0)
    # the generator moved away from the teacher, and the two LoRAs differ
    assert not torch.equal(unet_out(m.unet, inputs), out_before)
    gen = dict(zip(m.fake.names, m._lora))
    assert any(not torch.equal(gen[n], p) for n, p in zip(m.fake.names, m.fake.weights))


def test_one_set_of_base_weights(tiny_sd15, tmp_path):
    """dmd2_lora keeps one denoiser's weights: the real score holds the generator's base tensors, the fake score
    only LoRA tensors."""
    from helpers.lcm import shares_base_tensors

    m = make(tiny_sd15, tmp_path)
    assert shares_base_tensors(m.teacher_unet, m.unet)
    lora = sum(p.numel() for p in m._lora)
    assert sum(p.numel() for p in m.fake.parameters()) == lora


def test_debug_recipe_resumes_with_the_two_time_scale_counter(tiny_sd15, shapes_folder, tmp_path):
    assert_debug_recipe_resumes("dmd2_lora", "sd15", tiny_sd15, shapes_folder, tmp_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd15):
    out = tmp_path_factory.mktemp("dmd2-export")
    m = make(tiny_sd15, out, "--method.num_denoising_steps=4", "--method.backward_simulation=true")
    train_steps(m, fixed_batch(), 6, 1e-3)
    export = out / "export"
    export.mkdir()
    m.export(export)
    m.sampling_record().save(export)
    return m, export


def test_four_step_generator_visits_the_references_timesteps(exported):
    m, _ = exported
    assert m.generator_steps.tolist() == [999, 749, 499, 249]


def test_export_loads_in_stock_diffusers_and_samples_at_1_2_4_steps(exported, tiny_sd15, tmp_path):
    m, export = exported
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.load_lora_weights(str(export))
    assert count_lora_modules(pipe.unet) == count_lora_modules(m.unet)
    inputs = unet_inputs(m.unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(m.unet, inputs), rtol=1e-5, atol=1e-5)
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        pipe.scheduler.set_timesteps(steps)
        assert set(pipe.scheduler.timesteps.tolist()) <= {999, 749, 499, 249}
        image = pipe(
            "a red circle", num_inference_steps=steps, guidance_scale=1.0, height=RES, width=RES, output_type="np"
        ).images
        assert bool(torch.isfinite(torch.from_numpy(image)).all())
    record = read_sampling_record(export)
    assert (record.label, record.scheduler, record.steps, record.guidance) == ("DMD2-LoRA", "LCMScheduler", 4, 1.0)
    out = tmp_path / "gen"
    argv = ["generate", "--model", str(tiny_sd15), "--lora", str(export), "--prompt", "x", "--height", "32"]
    assert main([*argv, "--width", "32", "--out", str(out)]) == 0
    settings = json.loads((out / "generate.json").read_text())
    assert settings["scheduler_class"] == "LCMScheduler" and settings["steps"] == 4


def test_full_dmd2_trains_and_exports_a_pipeline(tiny_sd15, tmp_path):
    from diffusers import DiffusionPipeline

    m = make(tiny_sd15, tmp_path, name="dmd2")
    assert m.unet is not m.fake and m.teacher_unet is not m.unet
    before = {n: p.detach().clone() for n, p in m.teacher_unet.named_parameters()}
    train_steps(m, fixed_batch(), 3, 1e-4)
    assert all(torch.equal(p, before[n]) for n, p in m.teacher_unet.named_parameters())
    m.export(tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 1


def test_bad_knobs_are_one_line(tiny_sd15, tmp_path):
    from ldmkit.methods import load_config

    base = [f"--model.pretrained={tiny_sd15}", "--method.num_denoising_steps=1", "--method.validation_steps=[1]"]
    for bad, match in (
        (["--method.dfake_gen_update_ratio=0"], "dfake_gen_update_ratio must be >= 1"),
        (["--method.min_step_percent=0.99"], "min_step_percent and max_step_percent"),
        (["--method.validation_steps=[4]"], r"validation_steps must lie in 1..sampler_grid \(1\)"),
        (["--method.num_denoising_steps=2", "--method.sampler_grid=3"], r"sampler_grid \(3\) must be a multiple"),
    ):
        with pytest.raises(UserError, match=match):
            load_config("dmd2_lora/debug", [*base, *bad])
    assert isinstance(make(tiny_sd15, tmp_path), DMD2LoraMethod)
