"""Method ``uvit``: config wiring, the training objective, and an end-to-end run with resume and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmkit.errors import UserError
from ldmkit.methods import load_config

from helpers.uvit import features_dir, pinned_threads, seeded, shapes_dir  # noqa: F401

ROOT = Path(__file__).parents[1]
DEBUG = ROOT / "configs" / "uvit" / "debug.yaml"


def debug_cfg(tiny_sd15, features_dir, out: Path, *extra: str):
    return load_config(
        str(DEBUG), [f"--model.pretrained={tiny_sd15}", f"--data.path={features_dir}", f"--output_dir={out}", *extra]
    )


def test_p_uncond_is_the_data_layers_caption_dropout(tmp_path):
    assert load_config(str(DEBUG)).data.proportion_empty_prompts == 0.1
    with pytest.raises(UserError, match="conflicts"):
        load_config(str(DEBUG), ["--data.proportion_empty_prompts=0.3"])
    assert (
        load_config(
            str(DEBUG), ["--data.proportion_empty_prompts=0.3", "--method.p_uncond=null"]
        ).data.proportion_empty_prompts
        == 0.3
    )


def test_schedule_is_the_originals_scaled_linear():
    from ldmkit.methods.uvit import training_scheduler

    # U-ViT libs: stable_diffusion_beta_schedule = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(training_scheduler("epsilon").alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)


@pytest.fixture
def method(tiny_sd15, features_dir, tmp_path):
    from accelerate import Accelerator

    from ldmkit.methods.uvit import UViTMethod

    torch.manual_seed(0)
    return UViTMethod(debug_cfg(tiny_sd15, features_dir, tmp_path), Accelerator(cpu=True))


def _batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mean, logvar = torch.randn(n, 4, 4, 4, generator=g), torch.full((n, 4, 4, 4), -3.0)
    return {
        "latent_moments": torch.cat([mean, logvar], 1),
        "prompt_embeds": torch.randn(n, 77, 32, generator=g),
        "seed": torch.arange(n) + 1000 * seed,
    }


def test_loss_is_epsilon_mse_of_scaled_posterior_samples(method):
    from ldmkit.rng import SampleRNG

    batch = _batch()
    loss, _ = method.loss(batch)
    # By hand: z ~ N(mean, exp(logvar)) times 0.2301 (the recipe's scale, not the VAE's 0.18215), t in 0..999.
    rng = SampleRNG(batch["seed"])
    mean, logvar = batch["latent_moments"].chunk(2, dim=1)
    x0 = (mean + torch.exp(0.5 * logvar) * rng.randn(4, 4, 4)) * 0.2301
    noise, t = rng.randn(4, 4, 4), rng.randint(0, 1000)
    abar = method.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    ref = torch.nn.functional.mse_loss(method.unet(xt, t, batch["prompt_embeds"]).sample, noise)
    torch.testing.assert_close(loss, ref)
    pipe = method._pipeline(method.unet, method.family.vae, method.family.text_encoders[0])  # validation / export
    assert pipe.vae.config.scaling_factor == pytest.approx(0.2301)


def test_min_snr_loss_weights_each_sample(tiny_sd15, features_dir, tmp_path):
    """method.snr_gamma: per-sample epsilon MSE times min(SNR(t), gamma) / SNR(t) (Hang et al. 2023)."""
    from accelerate import Accelerator

    from ldmkit.methods.uvit import UViTMethod
    from ldmkit.rng import SampleRNG

    torch.manual_seed(0)
    method = UViTMethod(debug_cfg(tiny_sd15, features_dir, tmp_path, "--method.snr_gamma=0.5"), Accelerator(cpu=True))
    batch = _batch(8)
    loss, _ = method.loss(batch)
    rng = SampleRNG(batch["seed"])
    mean, logvar = batch["latent_moments"].chunk(2, dim=1)
    x0 = (mean + torch.exp(0.5 * logvar) * rng.randn(4, 4, 4)) * 0.2301
    noise, t = rng.randn(4, 4, 4), rng.randint(0, 1000)
    abar = method.noise_scheduler.alphas_cumprod[t]
    xt = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    snr = abar / (1 - abar)
    per_sample = (method.unet(xt, t, batch["prompt_embeds"]).sample - noise).square().mean(dim=(1, 2, 3))
    assert (snr > 0.5).any()  # some weights are below 1: the check below tells weighted from plain MSE
    torch.testing.assert_close(loss, (torch.clamp(snr, max=0.5) / snr * per_sample).mean())
    with pytest.raises(UserError, match="snr_gamma"):
        debug_cfg(tiny_sd15, features_dir, tmp_path, "--method.snr_gamma=0")


def test_loss_decreases(method):
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    batch = _batch(8)
    losses = []
    for _ in range(40):
        loss, _ = method.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_step(0)
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_train_resume_export(tiny_sd15, features_dir, tmp_path):
    from safetensors.torch import load_file

    from ldmkit.pipelines.uvit import UViTPipeline
    from ldmkit.train.loop import train

    steps = ["--train.max_steps=4", "--train.checkpoint_every=2", "--train.validate_every=2"]
    full = train(debug_cfg(tiny_sd15, features_dir, tmp_path / "full", *steps))
    train(debug_cfg(tiny_sd15, features_dir, tmp_path / "resumed", "--train.max_steps=2", "--train.checkpoint_every=2"))
    resumed = train(debug_cfg(tiny_sd15, features_dir, tmp_path / "resumed", *steps))

    a, b = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (full, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    la, lb = (
        [json.loads(x)["loss"] for x in (p.parent / "metrics.jsonl").read_text().splitlines()] for p in (full, resumed)
    )
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)
    assert (tmp_path / "full" / "samples" / "step-0000002.png").is_file()

    pipe = UViTPipeline.from_pretrained(full)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.2301)
    assert (full / "ldmkit_config.yaml").is_file()
    image = pipe("a large red circle in the center", num_inference_steps=3, generator=seeded()).images[0]
    assert image.size == (32, 32)
    # The export holds the EMA weights, not the raw ones.
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000004"
    ema = load_file(str(ckpt / "extra.safetensors"))
    raw = {
        k: v for f in ckpt.glob("*.safetensors") if f.name != "extra.safetensors" for k, v in load_file(str(f)).items()
    }
    from ldmkit.models.uvit import UViT

    names = [n for n, _ in UViT.from_pretrained(full / "unet").named_parameters()]  # EMA order
    for name in ("pos_embed", "out_blocks.0.skip_linear.weight"):
        shadow = ema[f"ema.shadow_params.{names.index(name)}"]
        (trained,) = [v for k, v in raw.items() if k == name or k.endswith("." + name)]
        assert torch.equal(a[name], shadow) and not torch.equal(a[name], trained)


def _te_cfg(tiny_sd15, shapes_dir, out: Path, *extra: str):
    """Images (cached latents) and the text encoder trained with the U-ViT."""
    return debug_cfg(
        tiny_sd15,
        shapes_dir,
        out,
        "--data.format=auto",
        "--data.cache=true",
        f"--data.cache_dir={out.parent / 'cache'}",
        "--method.train_text_encoder=true",
        "--method.scale_factor=null",
        *extra,
    )


def test_train_text_encoder_needs_captions(tiny_sd15, features_dir, tmp_path):
    with pytest.raises(UserError, match="train_text_encoder needs captions"):
        debug_cfg(tiny_sd15, features_dir, tmp_path, "--method.train_text_encoder=true")


def test_train_text_encoder_gets_gradients_from_the_loss(tiny_sd15, shapes_dir, tmp_path):
    from accelerate import Accelerator

    from ldmkit.methods.uvit import UViTMethod

    torch.manual_seed(0)
    method = UViTMethod(_te_cfg(tiny_sd15, shapes_dir, tmp_path / "run"), Accelerator(cpu=True))
    te = method.text_encoder
    assert te.dtype == torch.float32 and all(p.requires_grad for p in te.parameters())
    assert {id(p) for p in te.parameters()} <= {id(p) for p in method.parameters()}
    g = torch.Generator().manual_seed(0)
    batch = {
        "latent_moments": torch.cat([torch.randn(4, 4, 4, 4, generator=g), torch.full((4, 4, 4, 4), -3.0)], 1),
        # cached embeddings of the base encoder are ignored: the captions are encoded by the trained one
        "prompt_embeds": torch.zeros(4, 77, 32),
        "captions": ["a large red circle", "a small blue square", "", "a red square"],
        "seed": torch.arange(4),
    }
    loss, _ = method.loss(batch)
    loss.backward()
    grad = te.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # Same loss as the frozen path given the trained encoder's own embeddings (nothing else changes).
    with torch.no_grad():
        embeds = method.family.encode_prompts(batch["captions"], [te])["prompt_embeds"]
        method.mcfg.train_text_encoder = False
        frozen, _ = method.loss({**batch, "prompt_embeds": embeds})
    torch.testing.assert_close(frozen, loss.detach(), rtol=1e-6, atol=1e-7)


def test_train_text_encoder_resume_and_export(tiny_sd15, shapes_dir, tmp_path):
    from safetensors.torch import load_file

    from ldmkit.pipelines.uvit import UViTPipeline
    from ldmkit.train.loop import train

    steps = ["--train.max_steps=4", "--train.checkpoint_every=2", "--train.validate_every=0"]
    full = train(_te_cfg(tiny_sd15, shapes_dir, tmp_path / "full", *steps))
    train(_te_cfg(tiny_sd15, shapes_dir, tmp_path / "resumed", "--train.max_steps=2", "--train.checkpoint_every=2"))
    resumed = train(_te_cfg(tiny_sd15, shapes_dir, tmp_path / "resumed", *steps))
    te_file = "text_encoder/model.safetensors"
    for part in ("unet/diffusion_pytorch_model.safetensors", te_file):
        a, b = (load_file(str(p / part)) for p in (full, resumed))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The export carries the trained encoder's EMA weights, not the base's and not the raw trained ones.
    base = load_file(str(tiny_sd15 / te_file))
    exported = load_file(str(full / te_file))
    (key,) = [k for k in base if k.endswith("token_embedding.weight")]
    assert not torch.equal(exported[key], base[key])
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000004"
    raw = {
        k: v for f in ckpt.glob("*.safetensors") if f.name != "extra.safetensors" for k, v in load_file(str(f)).items()
    }
    (trained,) = [v for k, v in raw.items() if k.endswith(key)]
    assert not torch.equal(exported[key], trained)
    pipe = UViTPipeline.from_pretrained(full)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a large red circle", num_inference_steps=2, generator=seeded()).images[0].size == (32, 32)
