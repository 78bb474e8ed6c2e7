"""The flow-matching families (SD3, FLUX) on their tiny random twins: the folders are stock diffusers
pipelines that generate, and every family convention (prompt encoding, the denoiser call with FLUX's
packing and guidance, latents with shift and scale, the cache, pipelines and exports) equals what the
diffusers pipelines do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldmkit.errors import UserError

TOL = dict(rtol=3e-3, atol=3e-3)  # the cache stores float16
CAPTIONS = ["a red circle", "", "a caption longer than CLIP's 77 tokens " * 3]


@pytest.fixture(params=["sd3", "flux"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def folder(arch, request):
    return request.getfixturevalue(f"tiny_{arch}")


def family_of(folder, **kwargs):
    from ldmkit.config import ModelConfig
    from ldmkit.families import load_family

    return load_family(ModelConfig(pretrained=str(folder)), **kwargs)


def stock(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder)


def capture_calls(module: torch.nn.Module) -> list:
    """(kwargs, first output) of every forward of ``module`` from now on."""
    calls: list = []
    module.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out[0])), with_kwargs=True)
    return calls


def test_twins_are_stock_pipelines_that_generate(arch, folder):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = stock(folder)
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[arch]
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and not vae.use_quant_conv
    assert (vae.scaling_factor, vae.shift_factor) == {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[arch]
    if arch == "flux":  # FLUX.1-dev: guidance-distilled, resolution-dependent shift
        assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer_3" if arch == "sd3" else "tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    images = pipe(
        "a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_detected_and_loaded_lazily(arch, folder):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from ldmkit.families import Family, FluxFamily, SD3Family, SDFamily, detect_family
    from ldmkit.methods.checks import FAMILY_KEYS

    cls = {"sd3": SD3Family, "flux": FluxFamily}[arch]
    assert detect_family(folder) is cls
    family = family_of(folder)
    assert type(family) is cls and FAMILY_KEYS[family.name] == arch and family.objective == "flow"
    assert isinstance(family.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert family.noise_scheduler.config.shift == 3.0
    assert not any(family.loaded(p) for p in ("denoiser", "vae", "tokenizers", "text_encoders"))
    assert (family.vae_scale, family.vae_shift) == (
        family.vae_config["scaling_factor"],
        family.vae_config["shift_factor"],
    )
    assert family.exports_kohya  # the original-layout copy (ldmkit.lora.flux_layout / sd3_layout)
    # the diffusion families are unchanged
    assert Family.objective == SDFamily.objective == "diffusion" and SDFamily._noise_scheduler_class() is DDPMScheduler


def test_encode_prompts_equal_the_pipelines(arch, folder):
    family, pipe = family_of(folder), stock(folder)
    got = family.encode_prompts(CAPTIONS)
    uncond = family.unconditional(got)
    with torch.no_grad():  # as the pipelines' __call__ (SDPA picks other CPU kernels with autograd on)
        if arch == "sd3":
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=True)
            assert embeds.shape == (3, 77 + 256, 96) and pooled.shape == (3, 32 + 48)
        else:
            embeds, pooled, _ = pipe.encode_prompt(CAPTIONS)
            neg, neg_pooled, _ = pipe.encode_prompt([""] * 3)
            assert embeds.shape == (3, 512, 96) and pooled.shape == (3, 32)
    assert set(got) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(got["prompt_embeds"], embeds) and torch.equal(got["pooled_prompt_embeds"], pooled)
    # unconditional = the pipelines' negative prompt "" (encoded once, so up to batch-size rounding)
    torch.testing.assert_close(uncond["prompt_embeds"], neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond["pooled_prompt_embeds"], neg_pooled, rtol=0, atol=1e-6)


def test_denoise_is_the_pipelines_transformer_call(arch, folder):
    from ldmkit.families.flux import DEFAULT_GUIDANCE, image_ids, pack, unpack

    family, pipe = family_of(folder), stock(folder)
    calls = capture_calls(pipe.transformer)
    pipe(
        ["a red circle", "a blue square"], height=32, width=64, num_inference_steps=3, output_type="latent",
        guidance_scale=2.0 if arch == "flux" else 1.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    kwargs, out = calls[1]  # the second step: t below the maximum
    t = pipe.scheduler.timesteps[1].expand(2)  # scheduler units, sigma * 1000
    assert 0 < t[0] < 1000
    cond = {"prompt_embeds": kwargs["encoder_hidden_states"], "pooled_prompt_embeds": kwargs["pooled_projections"]}
    if arch == "sd3":
        x = kwargs["hidden_states"]  # (2, 16, 4, 8)
        assert torch.equal(kwargs["timestep"], t)
        assert torch.equal(family.denoise(pipe.transformer, x, t, cond), out)
        return
    packed = kwargs["hidden_states"]  # (2, 2 * 4, 64)
    x = unpack(packed, 4, 8)  # (2, 16, 4, 8): the latent grid of a 32 x 64 image
    assert x.shape == (2, 16, 4, 8) and torch.equal(pack(x), packed)
    assert torch.equal(kwargs["timestep"], t / 1000) and torch.equal(kwargs["guidance"], torch.full((2,), 2.0))
    assert torch.equal(kwargs["img_ids"], image_ids(4, 8, x.device, x.dtype))
    assert torch.equal(kwargs["txt_ids"], torch.zeros(512, 3))
    v = family.denoise(pipe.transformer, x, t, cond, torch.full((2,), 2.0))
    assert v.shape == x.shape and torch.equal(v, unpack(out, 4, 8))
    # without w_emb: the pipeline's default guidance 3.5
    direct = pipe.transformer(**{**kwargs, "guidance": torch.full((2,), DEFAULT_GUIDANCE)})[0]
    assert torch.equal(family.denoise(pipe.transformer, x, t, cond), unpack(direct, 4, 8))
    with pytest.raises(UserError, match="even"):
        family.denoise(pipe.transformer, torch.zeros(1, 16, 3, 4), t[:1], cond)


def test_flux_schnell_twin_takes_no_guidance(tmp_path):
    from ldmkit.families import FluxFamily, detect_family
    from ldmkit.models.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline("flux-schnell", tmp_path / "schnell")
    assert detect_family(folder) is FluxFamily
    family = family_of(folder)
    assert not family.denoiser.config.guidance_embeds
    assert family.noise_scheduler.config.shift == 1.0 and not family.noise_scheduler.config.use_dynamic_shifting
    cond = family.encode_prompts(["a red circle"])
    x, t = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([750.0])
    assert torch.equal(
        family.denoise(family.denoiser, x, t, cond, torch.tensor([5.0])), family.denoise(family.denoiser, x, t, cond)
    )
    images = stock(folder)("a red circle", height=32, width=32, num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_latents_shift_then_scale(arch, folder):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from ldmkit.rng import SampleRNG

    family = family_of(folder)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = family.encode_images(pixels)  # (2, 32, 4, 4): mean and logvar of 16 channels
    assert moments.shape == (2, 32, 4, 4)
    assert torch.equal(moments, family.vae.encode(pixels).latent_dist.parameters)
    seeds = torch.tensor([3, 4])
    z = family.latents({"pixel_values": pixels}, SampleRNG(seeds))
    assert torch.equal(z, family.latents({"latent_moments": moments}, SampleRNG(seeds)))  # cached = uncached
    dist = DiagonalGaussianDistribution(moments)
    sample = dist.mean + dist.std * SampleRNG(seeds).randn(16, 4, 4)
    cfg = family.vae.config
    torch.testing.assert_close(z, (sample - cfg.shift_factor) * cfg.scaling_factor)
    # the pipelines decode latents / scaling_factor + shift_factor: back to the VAE's sample
    torch.testing.assert_close(z / cfg.scaling_factor + cfg.shift_factor, sample)


def test_cache_stores_prompt_and_pooled_embeddings(arch, folder, shapes_folder, tmp_path):
    from ldmkit.config import DataConfig
    from ldmkit.data import build_loader
    from ldmkit.rng import SampleRNG

    family = family_of(folder)
    cfg = DataConfig(
        path=str(shapes_folder), resolution=32, num_workers=0, cache=True, cache_dir=str(tmp_path / "cache"),
        max_samples=4, proportion_empty_prompts=0.0,
    )  # fmt: skip
    batch = next(build_loader(cfg, batch_size=2, seed=0, encoders=family))
    # the encoders were loaded only to build the cache; the empty prompt came from it
    assert not family.loaded("text_encoders") and not family.loaded("vae")
    assert {"latent_moments", "prompt_embeds", "pooled_prompt_embeds"} <= set(batch)
    text = family.text(batch)
    assert all(torch.equal(text[k], batch[k]) for k in ("prompt_embeds", "pooled_prompt_embeds"))
    cond, uncond = family.conditions(batch, resolution=32)
    assert not family.loaded("text_encoders")
    x = family.latents(batch, SampleRNG(batch["seed"]))
    assert x.shape == (2, 16, 4, 4)
    assert family.denoise(family.denoiser, x, torch.full((2,), 500.0), cond).shape == x.shape
    # equal to encoding now (float16 storage)
    ref, empty = family.encode_prompts(batch["captions"]), family.encode_prompts([""] * 2)
    for k in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(cond[k], ref[k], **TOL)
        torch.testing.assert_close(uncond[k], empty[k], **TOL)


def test_pipeline_samples_and_export_loads(arch, folder, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    family = family_of(folder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(family.noise_scheduler.config)
    pipe = family.pipeline(unet=family.denoiser, scheduler=scheduler)
    assert isinstance(pipe, family.pipeline_class) and pipe.transformer is family.denoiser
    images = pipe(
        "a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=family.lcm_lora_guidance,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3)
    assert family.pipeline_class.__name__ in family.pipeline_import

    model = family.load_denoiser()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a "trained" transformer
    family.export_pipeline(tmp_path / "export", unet=model, scheduler=scheduler)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert type(loaded) is family.pipeline_class
    assert torch.equal(next(loaded.transformer.parameters()), next(model.parameters()))


def test_lora_targets_cover_every_block_linear(arch, folder):
    from peft import LoraConfig

    family = family_of(folder)
    model = family.load_denoiser()
    targets = family.default_lora_targets("distill")
    assert set(family.default_lora_targets("finetune")) <= set(targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks = [n for n in linears if n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")]

    def targeted(name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in targets)

    # every linear of the blocks but the AdaLN modulation; every target name matches in the tiny twin
    assert [n for n in in_blocks if not targeted(n)] == [n for n in in_blocks if n.split(".")[-2].startswith("norm")]
    assert all(any(n.endswith("." + t) for n in linears) for t in targets)
    model.add_adapter(LoraConfig(r=2, target_modules=list(targets)))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {n for n in linears if targeted(n)}


def test_fingerprint_covers_every_text_encoder_and_tokenizer(tiny_sd3, tiny_flux, tmp_path):
    from ldmkit.families import SD3Family

    copy = shutil.copytree(tiny_sd3, tmp_path / "sd3")
    prints = {SD3Family(str(copy)).fingerprint(), family_of(tiny_flux).fingerprint()}
    assert SD3Family(str(copy)).fingerprint() == family_of(tiny_sd3).fingerprint()  # content, not path
    for part in ("tokenizer_3", "text_encoder_3", "tokenizer_2"):
        path = next(p for p in sorted((copy / part).iterdir()) if p.suffix == ".json")
        path.write_text(path.read_text().replace("{", '{"edited": 1, ', 1))
        prints.add(SD3Family(str(copy)).fingerprint())
    assert len(prints) == 5


def test_t5_feed_forward_outputs_stay_fp32_in_fp16(tiny_flux):
    family = family_of(tiny_flux, dtype=torch.float16)
    t5 = family.text_encoders[1]
    dtypes = {n: p.dtype for n, p in t5.named_parameters()}
    assert {d for n, d in dtypes.items() if ".wo." in n} == {torch.float32}  # as transformers loads T5 in fp16
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {torch.float16}
    embeds = family.encode_prompts(["a red circle"])
    assert embeds["prompt_embeds"].dtype == torch.float16 and torch.isfinite(embeds["prompt_embeds"]).all()


def test_schedule_is_the_pipelines_sigmas(arch, folder):
    """The training schedule's sigmas = the pipeline's 1000-step sigmas at that resolution (FLUX: shifted by
    the image's token count, calculate_shift of pipeline_flux.py; SD3: the static shift 3)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = family_of(folder)
    for resolution in (32, 256):
        schedule = family.schedule(None, resolution)
        assert schedule.is_flow and torch.equal(schedule.model_t, schedule.sigma * 1000)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(family.noise_scheduler.config)
        tokens = (resolution // 16) ** 2
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15) if arch == "flux" else None
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)
        torch.testing.assert_close(schedule.sigma, scheduler.sigmas[:-1].flip(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="velocity"):
        family.schedule("epsilon", 32)
