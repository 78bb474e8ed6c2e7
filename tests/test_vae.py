"""Method ``vae``: objective, measured scaling factor, fine-tuning, and exports that stock diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldmkit.errors import UserError
from ldmkit.inference import label_margins
from ldmkit.methods import load_config

from helpers.uvit import pinned_threads  # noqa: F401

ROOT = Path(__file__).parents[1]
DEBUG = ROOT / "configs" / "vae" / "debug.yaml"


def debug_cfg(data: Path, out: Path, *extra: str):
    return load_config(str(DEBUG), [f"--data.path={data}", f"--output_dir={out}", *extra])


def make_method(cfg):
    from accelerate import Accelerator

    from ldmkit.methods.vae import VAEMethod

    torch.manual_seed(0)
    return VAEMethod(cfg, Accelerator(cpu=True))


def _batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 3, 32, 32)
    for i in range(n):  # coloured squares on black, like the shapes data
        top, left = torch.randint(0, 20, (2,), generator=g).tolist()
        x[i, :, top : top + 10, left : left + 10] = torch.rand(3, 1, 1, generator=g)
    return {"pixel_values": x * 2 - 1, "seed": torch.arange(n)}


def _train(m, batch: dict, steps: int) -> list[float]:
    """``steps`` AdamW steps (lr 2e-3) of the method on one batch; the reconstruction loss of each."""
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        loss, logs = m.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m.after_step(step)
        losses.append(logs["rec_loss"])
    return losses


def test_loss_decreases_and_is_rec_plus_weighted_kl(shapes_folder, tmp_path):
    m = make_method(debug_cfg(shapes_folder, tmp_path, "--method.kl_weight=0.5"))
    batch = _batch()
    loss, logs = m.loss(batch)
    assert loss.item() == pytest.approx(logs["rec_loss"] + 0.5 * logs["kl"], rel=1e-5)
    losses = _train(m, batch, 30)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    grid = m.validate(30)
    left, _, s = label_margins((32, 32), True, False)
    assert grid.size == (left + 4 * 32 * s, 2 * 32 * s)  # originals over reconstructions, labelled


def test_latent_stats_give_one_over_std():
    from ldmkit.methods.vae import LatentStats

    stats = LatentStats(channels=2, momentum=0.9)
    z = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    for _ in range(3):
        stats.update(z.mean(dim=(0, 2, 3)), z.square().mean(dim=(0, 2, 3)))
    summary = stats.summary()
    assert summary["scaling_factor"] == pytest.approx(1 / z.double().std(unbiased=False).item(), rel=1e-6)
    restored = LatentStats(channels=2, momentum=0.9)
    restored.load_state_dict(stats.state_dict())
    assert restored.summary() == summary


def test_fine_tune_starts_from_the_given_vae(tiny_sd15, shapes_folder, tmp_path):
    m = make_method(debug_cfg(shapes_folder, tmp_path, f"--model.pretrained={tiny_sd15}"))
    ref = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    for a, b in zip(m.vae.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="no VAE"):
        make_method(debug_cfg(shapes_folder, tmp_path, f"--model.vae={tmp_path}"))
    with pytest.raises(UserError, match="norm_num_groups"):
        make_method(debug_cfg(shapes_folder, tmp_path, "--method.norm_num_groups=3"))


def test_decoder_only_fine_tuning_keeps_the_latent_space(tiny_sd15, shapes_folder, tmp_path):
    """train_encoder=false (sd-vae-ft-mse's recipe): the encoder's latents stay bit for bit, the decoder learns."""
    m = make_method(
        debug_cfg(shapes_folder, tmp_path, f"--model.pretrained={tiny_sd15}", "--method.train_encoder=false")
    )
    ref = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    trainable = {id(p) for p in m.parameters()}
    assert trainable == {id(p) for p in m.vae.decoder.parameters()} | {
        id(p) for p in m.vae.post_quant_conv.parameters()
    }
    batch = _batch()
    with torch.no_grad():
        before = m.vae.encode(batch["pixel_values"]).latent_dist.mean
        dec_before = m.vae.decode(before).sample
    _train(m, batch, 5)
    with torch.no_grad():
        assert torch.equal(m.vae.encode(batch["pixel_values"]).latent_dist.mean, before)
        assert torch.equal(
            m.vae.encode(batch["pixel_values"]).latent_dist.mean, ref.encode(batch["pixel_values"]).latent_dist.mean
        )
        assert not torch.allclose(m.vae.decode(before).sample, dec_before)
    with pytest.raises(UserError, match="train_encoder=false fine-tunes a VAE's decoder"):
        debug_cfg(shapes_folder, tmp_path, "--method.train_encoder=false")


def test_train_export_loads_in_stock_pipelines(tiny_sd15, shapes_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldmkit.train.loop import train

    export = train(debug_cfg(shapes_folder, tmp_path / "run", "--train.max_steps=6", "--train.checkpoint_every=3"))
    stats = json.loads((export / "vae_stats.json").read_text())
    vae = AutoencoderKL.from_pretrained(export)
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"]) and stats["steps"] == 6
    assert 0.05 < stats["scaling_factor"] < 20 and stats["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert (tmp_path / "run" / "samples" / "step-0000006.png").is_file()
    # resume state: the latent statistics travel through the checkpoint
    extra = json.loads((tmp_path / "run" / "checkpoints" / "step-0000006" / "extra.json").read_text())
    assert "latent_stats" in extra

    # The exported VAE drops into a stock SD pipeline (same 4 latent channels, KL-f8).
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, vae=vae, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_mid_block_attention_can_be_dropped(shapes_folder, tmp_path):
    """method.mid_block_attention=false: no attention module in the encoder or decoder (cheaper small VAEs)."""
    with_attn = make_method(debug_cfg(shapes_folder, tmp_path / "a"))
    without = make_method(debug_cfg(shapes_folder, tmp_path / "b", "--method.mid_block_attention=false"))
    attn = [n for n, _ in without.vae.named_modules() if n.endswith("attentions.0")]
    assert not attn and any(n.endswith("attentions.0") for n, _ in with_attn.vae.named_modules())
    assert without.vae.config.mid_block_add_attention is False


@pytest.mark.parametrize("recompute", [None, True])
def test_fine_tuning_keeps_the_scaling_factor_unless_asked(tiny_sd15, shapes_folder, tmp_path, recompute):
    """An SD VAE's factor is what every SD pipeline decodes with: fine-tuning must not rewrite it silently."""
    from ldmkit.train.loop import train

    given = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae").config.scaling_factor
    extra = [f"--model.pretrained={tiny_sd15}", "--train.max_steps=3", "--train.learning_rate=1e-6"]
    if recompute:
        extra.append("--method.recompute_scaling_factor=true")
    export = train(debug_cfg(shapes_folder, tmp_path / "run", *extra))
    stats = json.loads((export / "vae_stats.json").read_text())
    factor = AutoencoderKL.from_pretrained(export).config.scaling_factor
    assert stats["measured_scaling_factor"] == pytest.approx(1 / stats["std"])
    assert abs(stats["measured_scaling_factor"] - given) > 1e-3  # the data's latents differ from SD's
    if recompute:
        assert factor == pytest.approx(stats["measured_scaling_factor"])
    else:
        assert factor == given and stats["scaling_factor"] == given
