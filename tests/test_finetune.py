"""finetune and lora methods on tiny SD1.5 / SDXL models: training reduces the loss, cached and raw
batches agree, and the exports load in stock diffusers (adapted modules counted, outputs compared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmkit.errors import UserError
from ldmkit.inference import label_margins
from ldmkit.methods.finetune import FinetuneConfig, FinetuneMethod, LoraMethod, LoraMethodConfig

from helpers.sd import accelerator, make_batch, make_cfg, pinned_threads  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # fmt: skip


def train_steps(method, batch, steps: int, lr: float) -> list[float]:
    """AdamW on one fixed batch (same per-sample seeds, so the same noise and timesteps every step)."""
    opt = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(1, steps + 1):
        loss, logs = method.loss(batch)
        assert set(logs) == {"mse"}
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_step(step)
        losses.append(loss.item())
    return losses


def unet_inputs(unet, seed: int = 0) -> tuple[tuple, dict]:
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    args = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
    )
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(
                2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g
            ),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return args, kwargs


@torch.no_grad()
def unet_out(unet) -> torch.Tensor:
    args, kwargs = unet_inputs(unet)
    return unet(*args, **kwargs).sample


@torch.no_grad()
def text_out(te) -> torch.Tensor:
    ids = torch.tensor([[510, 40, 50, 60, 511] + [511] * 72])
    return te(ids, output_hidden_states=True).hidden_states[-2]


def count(model) -> int:
    from helpers.lcm import count_lora_modules

    return count_lora_modules(model)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_trains_and_both_export_formats_load_in_stock_pipelines(arch, request, tmp_path):
    from diffusers import DiffusionPipeline

    from ldmkit.lora.export import KOHYA_WEIGHT_NAME

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    # alpha != rank: the export must carry the scale; text-encoder LoRA on every encoder.
    mcfg = LoraMethodConfig(
        lora_rank=4, lora_alpha=2.0, lora_target_modules=LCM_LORA_TARGETS, train_text_encoder=True, snr_gamma=5.0
    )
    method = LoraMethod(make_cfg(model_dir, mcfg), accelerator())
    n_te = 2 if arch == "sdxl" else 1
    assert method.trainable_names == ("unet", "text_encoder", "text_encoder_2")[: 1 + n_te]
    assert all(p.dtype == torch.float32 and "lora" in n for n, p in method.unet.named_parameters() if p.requires_grad)
    losses = train_steps(method, make_batch(2), steps=6, lr=3e-3)
    assert losses[-1] < 0.9 * losses[0], losses

    method.export(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists() and (tmp_path / KOHYA_WEIGHT_NAME).exists()
    method.unet.eval()
    trained = [method.unet] + [getattr(method, n) for n in method.trainable_names[1:]]
    expect = [unet_out(method.unet)] + [text_out(te) for te in trained[1:]]
    te_names = ["text_encoder", "text_encoder_2"][:n_te]

    for weight_name in ("pytorch_lora_weights.safetensors", KOHYA_WEIGHT_NAME):
        pipe = DiffusionPipeline.from_pretrained(model_dir)
        base = unet_out(pipe.unet)
        pipe.load_lora_weights(tmp_path, weight_name=weight_name)
        loaded = [pipe.unet] + [getattr(pipe, n) for n in te_names]
        # Count modules: a partial load only warns and still changes the output (diffusers 0.42 load_lora_weights with mixed key styles).
        assert [count(m) for m in loaded] == [count(m) for m in trained], weight_name
        assert count(pipe.unet) > 40
        torch.testing.assert_close(unet_out(pipe.unet), expect[0], atol=1e-5, rtol=1e-4)
        for te, ref in zip(loaded[1:], expect[1:]):
            torch.testing.assert_close(text_out(te), ref, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base, expect[0], atol=1e-4)  # the LoRA did change the UNet


def test_finetune_with_ema_trains_validates_and_exports_a_pipeline(tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    method = FinetuneMethod(
        make_cfg(tiny_sd15, FinetuneConfig(use_ema=True, ema_decay=0.5, validation_steps=[2])), accelerator()
    )
    assert method.trainable_names == ("unet",)
    assert method.unet.dtype == torch.float32 and not any(
        p.requires_grad for p in method.family.text_encoders[0].parameters()
    )
    losses = train_steps(method, make_batch(2), steps=5, lr=1e-3)
    assert losses[-1] < 0.8 * losses[0], losses

    raw = {k: v.clone() for k, v in method.unet.state_dict().items()}
    ema = dict(zip([n for n, _ in method.unet.named_parameters()], method.ema.shadow_params))
    assert "ema_unet" in method.checkpoint_objects()
    grid = method.validate(5)
    left, top, s = label_margins((64, 64), True, True)
    assert grid.size == (left + 64 * s, top + 128 * s)  # a row per prompt (2), a column per step count (1), 64 px each
    assert method.unet.training

    method.export(tmp_path)
    assert all(torch.equal(v, raw[k]) for k, v in method.unet.state_dict().items())  # EMA swapped back out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    exported = dict(pipe.unet.named_parameters())
    assert all(torch.equal(exported[k], v) for k, v in ema.items())
    assert any(not torch.equal(exported[k], raw[k]) for k in ema)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_finetune_sdxl_v_prediction_exports_its_prediction_type(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    mcfg = FinetuneConfig(
        prediction_type="v_prediction", use_fix_crop_and_size=True, noise_offset=0.05, input_perturbation=0.1
    )
    method = FinetuneMethod(make_cfg(tiny_sdxl, mcfg), accelerator())
    assert method.family.noise_scheduler.config.prediction_type == "v_prediction"
    losses = train_steps(method, make_batch(2), steps=3, lr=1e-3)
    assert losses[-1] < losses[0]
    method.export(tmp_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_cached_batches_load_no_encoders_and_give_the_raw_loss(tiny_sd15):
    cached_method = FinetuneMethod(make_cfg(tiny_sd15, FinetuneConfig(validation_steps=[2]), cache=True), accelerator())
    assert not cached_method.family.loaded("vae") and not cached_method.family.loaded("text_encoders")
    raw_method = FinetuneMethod(make_cfg(tiny_sd15, FinetuneConfig()), accelerator())
    assert raw_method.encoders() is raw_method.family

    enc = cached_method.encoders()  # loaded on demand for the cache builder, dropped after it (as build_loader)
    batch = make_batch(3)
    cached = {k: v for k, v in batch.items() if k != "pixel_values"}
    with enc.transient():
        cached["latent_moments"] = enc.encode_images(batch["pixel_values"])
        cached.update(enc.encode_prompts(batch["captions"]))
    assert not cached_method.family.loaded("vae") and not cached_method.family.loaded("text_encoders")
    assert enc.fingerprint() == raw_method.family.fingerprint()
    with torch.no_grad():
        torch.testing.assert_close(cached_method.loss(cached)[0], raw_method.loss(batch)[0])
    assert not cached_method.family.loaded("vae")  # the cached loss needs no VAE
    left, top, s = label_margins((64, 64), True, True)
    assert cached_method.validate(1).size == (left + 64 * s, top + 128 * s)  # VAE and text encoder loaded just for this
    assert not cached_method.family.loaded("vae") and not cached_method.family.loaded("text_encoders")


def test_config_errors_are_user_errors(tiny_sd15):
    with pytest.raises(UserError, match="train_text_encoder"):
        FinetuneMethod(make_cfg(tiny_sd15, FinetuneConfig(train_text_encoder=True), cache=True), accelerator())
    with pytest.raises(UserError, match="lora_rank"):
        LoraMethod(make_cfg(tiny_sd15, LoraMethodConfig(lora_rank=0)), accelerator())
    with pytest.raises(UserError, match="lora_target_modules"):
        LoraMethod(make_cfg(tiny_sd15, LoraMethodConfig(lora_target_modules=["no_such_module"])), accelerator())


def test_lora_dropout_is_reproducible_from_the_batch_seeds(tiny_sd15):
    method = LoraMethod(make_cfg(tiny_sd15, LoraMethodConfig(lora_dropout=0.5)), accelerator())
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.1)  # nonzero B, so dropout matters
        batch = make_batch(2)
        a, b = method.loss(batch)[0], method.loss(batch)[0]
        c = method.loss(make_batch(2, seed=1))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


RECIPES = sorted((ROOT / "configs").glob("finetune/*.yaml")) + sorted((ROOT / "configs").glob("lora/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_validate(path, monkeypatch):
    from ldmkit.methods import load_config

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the production recipes train in fp16
    cfg = load_config(str(path))
    assert cfg.method.name == path.parent.name
    assert isinstance(cfg.method, {"finetune": FinetuneConfig, "lora": LoraMethodConfig}[path.parent.name])
    if path.stem.startswith("debug"):
        assert cfg.model.pretrained.startswith("outputs/tiny-") and cfg.data.resolution == 64
        assert cfg.train.max_steps <= 10 and cfg.train.mixed_precision == "no"


def test_every_recipe_has_a_debug_twin():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    assert {(m, r) for m in ("finetune", "lora") for r in ("sd15", "sdxl", "debug", "debug_sdxl")} <= names


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, arch, extra",
    [("lora/debug.yaml", "sd15", ["--data.cache=true"]), ("finetune/debug_sdxl.yaml", "sdxl", ["--train.max_steps=2"])],
)
def test_debug_recipes_train_end_to_end(recipe, arch, extra, request, shapes_folder, tmp_path):
    """The debug twins through the real loop: samples, checkpoints, an export that loads in stock
    diffusers; running the same command again resumes at the end and does not train."""
    from diffusers import DiffusionPipeline

    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    from helpers.lcm import count_lora_modules

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    overrides = [f"--model.pretrained={model_dir}", f"--data.path={shapes_folder}", f"--output_dir={tmp_path}", *extra]
    cfg = load_config(str(ROOT / "configs" / recipe), overrides)
    export = train(cfg)
    assert (tmp_path / "samples" / "step-0000002.png").exists()
    assert (export / "ldmkit_config.yaml").exists()
    pipe = DiffusionPipeline.from_pretrained(model_dir if cfg.method.name == "lora" else export)
    if cfg.method.name == "lora":
        assert (tmp_path / "cache").is_dir()
        pipe.load_lora_weights(export)
        assert count_lora_modules(pipe.unet) == 32  # to_q/k/v/out.0 of the tiny UNet's 8 attention layers
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert train(load_config(str(ROOT / "configs" / recipe), overrides)) == export
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines


def test_training_the_text_encoder_refuses_precomputed_embeddings(tiny_sd15):
    method = LoraMethod(make_cfg(tiny_sd15, LoraMethodConfig(train_text_encoder=True)), accelerator())
    batch = make_batch(2) | {"prompt_embeds": torch.zeros(2, 77, 32)}
    with pytest.raises(UserError, match="train_text_encoder"):
        method.loss(batch)
