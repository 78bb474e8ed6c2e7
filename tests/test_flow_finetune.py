"""lora and finetune on rectified-flow models (tiny SD3 and FLUX.1-dev twins): the flow helpers equal diffusers'
training_utils, the loss equals diffusers' train_dreambooth_lora_sd3.py / _flux.py loss transcribed by hand with
their helpers, it decreases, the LoRA export loads in stock diffusers with every module adapted and generates, the
full fine-tune exports a pipeline, the debug recipes resume exactly, and the DDPM knobs are refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ldmkit.diffusion import flow_loss
from ldmkit.errors import UserError
from ldmkit.rng import SampleRNG

from helpers.lcm import count_lora_modules, fixed_batch, train_steps
from helpers.runs import assert_debug_recipe_resumes
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

RES = 32
ARCHS = ("sd3", "flux")
KNOBS = dict(logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
KNOBS_ARGS = tuple(f"--method.{k}={v}" for k, v in KNOBS.items())


def make(name: str, model, tmp_path, *extra: str):
    from accelerate import Accelerator

    from ldmkit.methods import get_method, load_config

    small = ["--method.lora_rank=4", "--method.lora_alpha=4"] if name == "lora" else []
    cfg = load_config(
        None,
        [
            f"--method.name={name}",
            f"--model.pretrained={model}",
            f"--data.resolution={RES}",
            "--train.report_to=none",
            "--train.validation_prompts=[a red circle]",
            f"--output_dir={tmp_path}",
            "--method.validation_steps=[2]",
            *small,
            *extra,
        ],
    )
    return get_method(name)(cfg, Accelerator(cpu=True))


def random_lora(method, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("scheme", flow_loss.WEIGHTING_SCHEMES)
def test_density_index_and_weights_equal_diffusers_helpers(scheme):
    """Same generator, same draws: u of compute_density_for_timestep_sampling, the scheduler sigma at the scripts'
    index (u * T).long(), and compute_loss_weighting_for_sd3."""
    theirs = compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(1), **KNOBS)
    g = torch.Generator().manual_seed(1)
    draw = torch.randn(64, generator=g) if flow_loss.draws_normal(scheme) else torch.rand(64, generator=g)
    ours = flow_loss.timestep_density(scheme, draw, **KNOBS)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)

    from ldmkit.diffusion.schedule import Schedule

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigma_theirs = sched.sigmas[(theirs * 1000).long()]
    sigma_ours = Schedule.flow(1000, 3.0).sigma[flow_loss.train_index(ours, 1000)]
    torch.testing.assert_close(sigma_ours, sigma_theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        flow_loss.loss_weighting(scheme, sigma_ours),
        compute_loss_weighting_for_sd3(scheme, sigma_theirs),
        rtol=1e-5,
        atol=0,
    )
    assert int(flow_loss.train_index(torch.tensor([1.0]), 1000)) == 0  # u = 1 (the scripts index past the end)


def scripts_loss(m, batch, scheme: str, guidance: float = 3.5, mu: float | None = None) -> torch.Tensor:
    """train_dreambooth_lora_sd3.py / _flux.py's loss with their helpers, on the method's per-sample generators:
    noise, u (compute_density_for_timestep_sampling), timesteps = scheduler.timesteps[(u * T).long()], sigmas,
    x_t = (1 - sigma) x0 + sigma noise, the transformer (FLUX.1-dev: guidance input), weighting, target noise - x0."""
    fam = m.family
    shift = {"shift": m.mcfg.flow_shift} if m.mcfg.flow_shift else {}  # the scripts' scheduler, shift overridden
    sched = FlowMatchEulerDiscreteScheduler.from_config(fam.noise_scheduler.config, **shift)
    if mu is not None:  # flow_resolution_shift: the pipeline's sigmas at the batch's token count
        sched.set_timesteps(sigmas=list(torch.linspace(1.0, 1 / 1000, 1000).numpy()), mu=mu)
    rng = SampleRNG(batch["seed"])
    x0 = fam.latents(batch, rng)
    noise = rng.randn(*x0.shape[1:])
    u = torch.cat(
        [compute_density_for_timestep_sampling(scheme, 1, generator=g, **KNOBS) for g in rng.generators]
    )  # per sample: its own generator, batch size 1
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    sigmas = sched.sigmas[indices].reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    cond = fam.condition(batch, resolution=RES)
    g = torch.full((x0.shape[0],), guidance) if fam.guidance_embedded else None
    pred = fam.denoise(m.unet, noisy, timesteps, cond, g)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    target = noise - x0
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(x0.shape[0], -1), 1).mean()


@pytest.mark.parametrize(
    "arch,scheme,extra",
    [
        ("sd3", "none", ()),
        ("sd3", "logit_normal", ()),
        ("sd3", "cosmap", ()),
        ("sd3", "mode", ("--method.flow_shift=1.5",)),
        ("flux", "none", ()),
        ("flux", "mode", ("--method.guidance_scale=2.0",)),
        ("flux", "sigma_sqrt", ()),
        ("flux", "logit_normal", ("--method.flow_resolution_shift=true",)),
    ],
)
def test_loss_is_the_dreambooth_scripts_loss_by_hand(arch, scheme, extra, request, tmp_path):
    m = make(
        "lora",
        request.getfixturevalue(f"tiny_{arch}"),
        tmp_path,
        f"--method.weighting_scheme={scheme}",
        *KNOBS_ARGS,
        *extra,
    )
    random_lora(m)
    batch = fixed_batch(4)
    loss, logs = m.loss(batch)
    mu = None
    if m.mcfg.flow_resolution_shift:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = m.family.noise_scheduler.config
        mu = calculate_shift((RES // 8 // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    guidance = m.mcfg.guidance_scale or 3.5
    torch.testing.assert_close(loss, scripts_loss(m, batch, scheme, guidance, mu), rtol=2e-5, atol=1e-7)
    assert set(logs) == {"mse"}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_and_its_export_loads_in_stock_diffusers(arch, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{arch}")
    m = make("lora", model, tmp_path)
    losses = train_steps(m, fixed_batch(), 20, 3e-3)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    grid = m.validate(1)  # the folder's FlowMatchEulerDiscreteScheduler, the family's default guidance
    assert grid is not None and m.mcfg.validation_guidance == {"sd3": 7.0, "flux": 3.5}[arch]
    export = tmp_path / "export"
    m.export(export)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(export))
    assert count_lora_modules(pipe.transformer) == count_lora_modules(m.unet) > 0  # every module adapted
    x = torch.randn(1, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    cond = m.family.condition(fixed_batch(1), resolution=RES)
    t = torch.tensor([500.0])
    g = torch.tensor([3.5]) if arch == "flux" else None
    m.unet.eval()
    with torch.no_grad():
        ours = m.family.denoise(m.unet, x, t, cond, g)
        theirs = m.family.denoise(pipe.transformer, x, t, cond, g)
        base = m.family.denoise(DiffusionPipeline.from_pretrained(model).transformer, x, t, cond, g)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the LoRA was trained and changes the output
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=RES, width=RES, output_type="np").images
    assert image.shape == (1, RES, RES, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


@pytest.mark.parametrize("arch,extra", [("sd3", ()), ("flux", ()), ("flux", ("--method.train_text_encoder=true",))])
def test_finetune_trains_and_exports_a_pipeline(arch, extra, request, tmp_path):
    """The EMA transformer (and a trained CLIP encoder) in a pipeline folder with the flow scheduler that generates."""
    model = request.getfixturevalue(f"tiny_{arch}")
    m = make("finetune", model, tmp_path, "--method.use_ema=true", "--method.weighting_scheme=logit_normal", *extra)
    losses = train_steps(m, fixed_batch(), 20, 1e-3)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    export = tmp_path / "export"
    m.export(export)
    pipe = DiffusionPipeline.from_pretrained(export)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=RES, width=RES, output_type="np").images
    assert image.shape == (1, RES, RES, 3)
    exported = dict(pipe.transformer.named_parameters())
    for (name, _), shadow in zip(m.unet.named_parameters(), m.ema.shadow_params):  # the EMA weights, not the last
        torch.testing.assert_close(exported[name], shadow.float())
    assert any(not torch.equal(last, shadow) for last, shadow in zip(m.unet.parameters(), m.ema.shadow_params))
    for name in m.text_encoder_names:  # FLUX: CLIP-L trained (no EMA: diffusers' EMA tracks the denoiser only)
        assert name == "text_encoder"
        trained, base = m.text_encoder.state_dict(), DiffusionPipeline.from_pretrained(model).text_encoder.state_dict()
        assert any(not torch.equal(trained[k], base[k]) for k in trained)
        for k, v in pipe.text_encoder.state_dict().items():
            torch.testing.assert_close(v, trained[k])


@pytest.mark.parametrize("name", ["lora", "finetune"])
@pytest.mark.parametrize("arch", ARCHS)
def test_debug_recipe_resumes_exactly(name, arch, request, shapes_folder, tmp_path):
    assert_debug_recipe_resumes(name, arch, request.getfixturevalue(f"tiny_{arch}"), shapes_folder, tmp_path)


@pytest.mark.parametrize(
    "arg",
    [
        "--method.snr_gamma=5",
        "--method.noise_offset=0.05",
        "--method.input_perturbation=0.1",
        "--method.prediction_type=epsilon",
    ],
)
def test_ddpm_knobs_are_refused_on_a_flow_family(arg, tiny_flux, tmp_path):
    key = arg.split("=")[0].removeprefix("--method.")
    with pytest.raises(UserError, match=f"method.{key} "):
        make("lora", tiny_flux, tmp_path, arg)


def test_flow_knobs_are_refused_where_they_do_not_apply(tiny_sd15, tiny_sd3, tmp_path):
    assert make("lora", tiny_sd15, tmp_path).mcfg.validation_guidance == 7.5  # SD: as before
    with pytest.raises(UserError, match="method.weighting_scheme does not apply to SD"):
        make("lora", tiny_sd15, tmp_path, "--method.weighting_scheme=cosmap")
    with pytest.raises(UserError, match="method.guidance_scale feeds a guidance-distilled"):
        make("lora", tiny_sd3, tmp_path, "--method.guidance_scale=3.5")
    with pytest.raises(UserError, match="set one"):
        make("lora", tiny_sd3, tmp_path, "--method.flow_shift=2", "--method.flow_resolution_shift=true")


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_debug_recipe_trains_validates_and_exports(arch, request, shapes_folder, tmp_path):
    """Through the real loop with the cache (no text encoder in training) and validation grids; config.yaml shows
    the family's validation guidance; the export loads in the stock pipeline with every module adapted."""
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    model = request.getfixturevalue(f"tiny_{arch}")
    overrides = [f"--model.pretrained={model}", f"--data.path={shapes_folder}", f"--output_dir={tmp_path}"]
    cfg = load_config(f"lora/debug_{arch}", overrides)
    assert cfg.method.validation_guidance == {"sd3": 7.0, "flux": 3.5}[arch]  # filled when the config resolves
    export = train(cfg)
    assert (tmp_path / "samples" / "step-0000002.png").exists() and (tmp_path / "cache").is_dir()
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(export)
    n = count_lora_modules(pipe.transformer)
    assert (
        n
        == sum(
            1
            for name, _ in pipe.transformer.named_modules()
            if name.endswith(
                ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
            )
        )
        > 0
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_on_the_clip_text_encoders_loads_in_stock_diffusers(arch, request, tmp_path):
    """method.train_text_encoder: LoRA on the CLIP encoders (SD3 both, FLUX CLIP-L), T5 frozen, as the dreambooth
    scripts; the export's text-encoder adapters load with every module and give the in-memory encoders' outputs."""
    model = request.getfixturevalue(f"tiny_{arch}")
    m = make("lora", model, tmp_path, "--method.train_text_encoder=true")
    clip = {"sd3": ("text_encoder", "text_encoder_2"), "flux": ("text_encoder",)}[arch]
    assert m.text_encoder_names == clip and m.trainable_names == ("unet", *clip)
    losses = train_steps(m, fixed_batch(), 10, 3e-3)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    export = tmp_path / "export"
    m.export(export)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(export))
    for name in clip:
        tok = getattr(pipe, name.replace("text_encoder", "tokenizer"))
        ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        ours, theirs = getattr(m, name).eval(), getattr(pipe, name)
        assert count_lora_modules(theirs) == count_lora_modules(ours) > 0
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids)[0], ours(ids)[0], rtol=1e-4, atol=1e-5)
    assert m.validate(1) is not None
