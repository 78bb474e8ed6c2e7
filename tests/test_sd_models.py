"""Tiny pipelines, the SD / SDXL model families (against diffusers' own pipelines) and the fine-tuning loss helpers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldmkit.config import ModelConfig
from ldmkit.errors import UserError
from ldmkit.families import SDFamily, SDXLFamily, detect_family, load_family
from ldmkit.rng import SampleRNG

from helpers.sd import make_batch, pinned_threads  # noqa: F401  (autouse fixture)

LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # fmt: skip


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return load_family(ModelConfig(pretrained=str(tiny_sd15)))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_family(ModelConfig(pretrained=str(tiny_sdxl)))


# ---- tiny pipelines -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_pipeline_loads_in_stock_diffusers_and_generates(arch, request):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(f"tiny_{arch}")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[arch]
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)
    names = {n for n, _ in pipe.unet.named_modules()}
    for target in LCM_LORA_TARGETS:
        assert any(n == target or n.endswith("." + target) for n in names), target
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # KL-f8 like SD
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    if arch == "sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_tiny_pipeline_is_seeded_and_leaves_global_rng_alone(tmp_path):
    from safetensors.torch import load_file

    from ldmkit.models.tiny import build_tiny_pipeline

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    build_tiny_pipeline("sd15", tmp_path / "a", seed=1)
    assert torch.equal(torch.rand(1), before)
    build_tiny_pipeline("sd15", tmp_path / "b", seed=1)
    build_tiny_pipeline("sd15", tmp_path / "c", seed=2)
    w = {k: load_file(tmp_path / k / "unet" / "diffusion_pytorch_model.safetensors") for k in "abc"}
    assert all(torch.equal(w["a"][k], w["b"][k]) for k in w["a"])
    assert not all(torch.equal(w["a"][k], w["c"][k]) for k in w["a"])
    with pytest.raises(UserError, match="arch"):
        build_tiny_pipeline("sd4", tmp_path / "d")


def test_byte_tokenizer_is_one_token_per_character(tiny_sd15):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    ids = tok("A cat!").input_ids
    assert len(ids) == len("a cat!") - 1 + 2  # 5 non-space characters, lower-cased, + BOS/EOS
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.model_max_length == 77
    assert tok.decode(ids, skip_special_tokens=True) == "a cat !"  # CLIP splits punctuation into its own word


def test_tiny_model_command(tmp_path):
    import argparse

    from ldmkit.commands import tiny_model as tiny

    parser = argparse.ArgumentParser()
    tiny.add_arguments(parser)
    assert tiny.run(parser.parse_args(["--arch", "sdxl", "--out", str(tmp_path / "m"), "--seed", "3"])) == 0
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


# ---- families -------------------------------------------------------------------------------------
def _family(path, **kw):
    return load_family(ModelConfig(pretrained=str(path), vae=kw.pop("vae", None)), **kw)


def test_load_errors_name_the_problem(tmp_path, tiny_sd15):
    with pytest.raises(UserError, match="not found"):
        _family(tmp_path / "nope")
    with pytest.raises(UserError, match="empty"):
        load_family(ModelConfig(pretrained=""))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    shutil.rmtree(broken / "unet")
    family = _family(broken)  # fine while the UNet is not asked for
    with pytest.raises(UserError, match="unet"):
        _ = family.denoiser
    with pytest.raises(UserError, match="model.vae"):
        _family(tiny_sd15, vae=str(tmp_path))


def test_family_detection_and_lazy_parts(tiny_sd15, tiny_sdxl):
    assert detect_family(tiny_sd15) is SDFamily and detect_family(tiny_sdxl) is SDXLFamily
    family = _family(tiny_sdxl)
    assert not any(family.loaded(p) for p in ("denoiser", "vae", "tokenizers", "text_encoders"))
    with family.transient():
        assert len(family.text_encoders) == 2 and family.loaded("text_encoders")
    assert not family.loaded("text_encoders")  # loaded inside the block: dropped
    _ = family.vae
    with family.transient():
        _ = family.vae
    assert family.loaded("vae")  # loaded before the block: kept


def test_prompt_embeds_match_diffusers_pipelines(sd15, sdxl, tiny_sd15, tiny_sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    prompts = ["a red circle", ""]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    out = sd15.encode_prompts(prompts)
    assert set(out) == {"prompt_embeds"}
    torch.testing.assert_close(out["prompt_embeds"], ref)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    out = sdxl.encode_prompts(prompts)
    assert out["prompt_embeds"].shape == (2, 77, 80)  # both encoders' hidden_states[-2], concatenated
    torch.testing.assert_close(out["prompt_embeds"], ref)
    torch.testing.assert_close(out["pooled_prompt_embeds"], ref_pooled)


def test_encode_images_and_latents(sd15):
    batch = make_batch(3)
    moments = sd15.encode_images(batch["pixel_values"])
    with torch.no_grad():
        ref = sd15.vae.encode(batch["pixel_values"]).latent_dist.parameters
    assert moments.dtype == torch.float32 and moments.shape == (3, 8, 8, 8)
    torch.testing.assert_close(moments, ref)
    sd15.vae_batch_size = 1
    torch.testing.assert_close(sd15.encode_images(batch["pixel_values"]), ref)
    sd15.vae_batch_size = 32

    # Raw and cached batches give the same latents for the same sample seeds.
    z_raw = sd15.latents(batch, SampleRNG(batch["seed"]))
    cached = {k: v for k, v in batch.items() if k != "pixel_values"} | {"latent_moments": moments}
    z_cached = sd15.latents(cached, SampleRNG(batch["seed"]))
    torch.testing.assert_close(z_raw, z_cached)
    # z = scale * (mean + std * eps) with eps from the samples' own generators.
    mean, logvar = moments.chunk(2, dim=1)
    eps = SampleRNG(batch["seed"]).randn(4, 8, 8)
    torch.testing.assert_close(z_raw, 0.18215 * (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps))


def test_text_uses_cached_embeddings(sd15, sdxl):
    batch = make_batch(2)
    cached = torch.randn(2, 77, 32)
    assert torch.equal(sd15.text(batch | {"prompt_embeds": cached})["prompt_embeds"], cached)
    torch.testing.assert_close(
        sd15.text(batch)["prompt_embeds"], sd15.encode_prompts(batch["captions"])["prompt_embeds"]
    )
    with pytest.raises(UserError, match="pooled"):
        sdxl.text(batch | {"prompt_embeds": torch.randn(2, 77, 80)})
    out = sdxl.text(batch | {"prompt_embeds": torch.randn(2, 77, 80), "pooled_prompt_embeds": torch.randn(2, 48)})
    assert out["pooled_prompt_embeds"].shape == (2, 48)


def test_add_time_ids_are_height_width_crop_target(sdxl):
    batch = make_batch(2)
    batch["original_size"] = torch.tensor([[300, 200], [64, 128]])  # (height, width)
    batch["crop_top_left"] = torch.tensor([[5, 7], [0, 3]])
    ids = sdxl.add_time_ids(batch, 64)
    assert ids.tolist() == [[300, 200, 5, 7, 64, 64], [64, 128, 0, 3, 64, 64]]
    assert sdxl.add_time_ids(batch, 64, fix_crop_and_size=True).tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_fingerprint_tracks_vae_and_text_encoder_content(tmp_path, tiny_sd15):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd15, copy)
    light = _family(copy)
    fp = light.fingerprint()
    assert not any(light.loaded(p) for p in ("denoiser", "vae", "text_encoders"))  # needs no models in memory
    assert fp == _family(tiny_sd15).fingerprint()
    # The UNet is not part of it; the VAE weights, the text encoder and the dtype are.
    unet_file = copy / "unet" / "diffusion_pytorch_model.safetensors"
    w = load_file(unet_file)
    save_file({k: v + 1 for k, v in w.items()}, unet_file)
    assert _family(copy).fingerprint() == fp
    vae_file = copy / "vae" / "diffusion_pytorch_model.safetensors"
    w = load_file(vae_file)
    save_file({k: v * 1.01 for k, v in w.items()}, vae_file, metadata={"format": "pt"})
    fp_vae = _family(copy).fingerprint()
    assert fp_vae != fp
    assert _family(copy, dtype=torch.float16).fingerprint() != fp_vae


# ---- losses --------------------------------------------------------------------------------------
def test_diffusion_target_and_min_snr_weights():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from ldmkit.diffusion.losses import diffusion_target, min_snr_weights

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(diffusion_target(sched, x0, noise, t), noise)
    v_sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(v_sched, x0, noise, t), a * noise - s * x0)
    with pytest.raises(ValueError):
        diffusion_target(DDPMScheduler.from_config(sched.config, prediction_type="sample"), x0, noise, t)

    snr = compute_snr(sched, t)
    gamma = 5.0
    w_eps = min_snr_weights(sched, t, gamma, "epsilon")
    w_v = min_snr_weights(sched, t, gamma, "v_prediction")
    torch.testing.assert_close(w_eps, torch.stack([min(x, gamma) / x for x in snr]))
    torch.testing.assert_close(w_v, torch.stack([min(x, gamma) / (x + 1) for x in snr]))
    # Per sample: high-noise samples (SNR < gamma) keep weight 1, low-noise ones are down-weighted;
    # the reference bug would give every sample the first sample's weight.
    assert w_eps[-1] == 1.0 and w_eps[0] < 0.01
    assert len(set(w_eps.tolist())) > 1
