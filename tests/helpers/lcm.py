"""Helpers shared by the LCM / LoRA tests (test_lora_formats.py, test_lcd.py); tiny models come from
conftest.py's ``tiny_sd15`` / ``tiny_sdxl`` fixtures."""

from __future__ import annotations

import torch

from ldmkit.methods.lcd import LCM_LORA_TARGET_MODULES


def lora_unet(model_dir, rank: int = 4, alpha: float = 8.0, seed: int = 0):
    """The tiny UNet with an LCM-LoRA adapter whose up weights are random (so the LoRA changes outputs)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LCM_LORA_TARGET_MODULES)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet.eval()


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    """Random inputs for any tiny UNet (SDXL added conditions included)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        sample=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor([999, 259][:batch] + [500] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, 7, cfg.cross_attention_dim, generator=g),
    )
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return kw


@torch.no_grad()
def unet_out(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample


def count_lora_modules(model) -> int:
    """How many modules of ``model`` carry a peft LoRA adapter (to check a load did not skip any)."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and len(m.lora_A) > 0)


def base_tensors(model) -> dict:
    """The base (non-adapter) parameters of a peft-adapted ``model`` under the names they have without the
    adapters (peft's ``.base_layer`` dropped): what a plain teacher sharing them must hold, by identity."""
    return {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}


def shares_base_tensors(teacher, adapted) -> bool:
    """Whether ``teacher`` holds exactly ``adapted``'s base parameters, the same tensor objects."""
    base, own = base_tensors(adapted), dict(teacher.named_parameters())
    return own.keys() == base.keys() and all(own[k] is base[k] for k in base)


def fixed_batch(n: int = 2, res: int = 32) -> dict:
    """A batch of ``n`` smooth random images at ``res`` px (the batch contract of docs/DESIGN.md), the same
    every call: for losses that must decrease and for equal-input comparisons."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=res, mode="bilinear") * 2 - 1
    return {
        "pixel_values": smooth,
        "captions": ["a large red circle", ""][:n] + ["x"] * max(0, n - 2),
        "original_size": torch.tensor([[res, res]] * n),
        "crop_top_left": torch.zeros(n, 2, dtype=torch.long),
        "seed": torch.arange(n) + 7,
        "key": [str(i) for i in range(n)],
    }


def train_steps(method, batch: dict, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps of ``method`` on ``batch`` (after_step included); the losses."""
    opt = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for i in range(steps):
        loss, _ = method.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(i + 1)
        losses.append(loss.item())
    return losses


def make_distill_method(name: str, model_dir, out_dir, *extra: str, res: int = 32):
    """A distillation method (lcm_lora, lcd, tcd_lora, ...) on a tiny model, small: rank 4 for the LoRA
    methods, a 32-wide guidance embedding for the full ones; ``extra`` are more config overrides."""
    from dataclasses import fields

    from accelerate import Accelerator

    from ldmkit.methods import get_config_class, get_method, load_config

    knobs = {f.name for f in fields(get_config_class(name))}
    small = []
    if "lora_rank" in knobs:
        small = ["--method.lora_rank=4", "--method.lora_alpha=4"]
    elif "unet_time_cond_proj_dim" in knobs:
        small = ["--method.unet_time_cond_proj_dim=32"]
    cfg = load_config(
        None,
        [
            f"--method.name={name}",
            f"--model.pretrained={model_dir}",
            f"--data.resolution={res}",
            "--train.report_to=none",
            f"--output_dir={out_dir}",
            *small,
            *extra,
        ],
    )
    return get_method(name)(cfg, Accelerator(cpu=True))


def generate_at_few_steps(pipe, guidance: float, res: int = 32, eta: float | None = None) -> None:
    """The pipeline samples finite images at 1, 2, 4 and 8 steps (an export that stock diffusers runs)."""
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4, 8):
        kwargs = {} if eta is None else {"eta": eta}
        image = pipe(
            "a red circle",
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=res,
            width=res,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        ).images
        assert image.shape == (1, res, res, 3) and torch.isfinite(torch.from_numpy(image)).all()
