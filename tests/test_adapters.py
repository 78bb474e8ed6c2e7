"""method.adapter: DoRA, LoHa and LoKr through peft for lora and lcm_lora; every export loads in stock diffusers
(DoRA as itself, LoHa / LoKr as an exact LoRA of their updates) and reproduces the trained model."""

from __future__ import annotations

import pytest
import torch
from test_finetune import LCM_LORA_TARGETS, train_steps, unet_out

from ldmkit.lora.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from ldmkit.methods.finetune import LoraMethod, LoraMethodConfig

from helpers.sd import accelerator, make_batch, make_cfg, pinned_threads  # noqa: F401  (autouse fixture)


def _loads_and_matches(model_dir, folder, weight_name, expect, trained_unet):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(folder, weight_name=weight_name)
    torch.testing.assert_close(unet_out(pipe.unet), expect, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(base, expect, atol=1e-4)  # the adapter did change the UNet


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_lora_method_adapter_kinds_export_what_diffusers_loads(kind, tiny_sd15, tmp_path):
    mcfg = LoraMethodConfig(adapter=kind, lora_rank=4, lora_alpha=2.0, lora_target_modules=LCM_LORA_TARGETS)
    method = LoraMethod(make_cfg(tiny_sd15, mcfg), accelerator())
    tuner = {"dora": "LoraLayer", "loha": "LoHaLayer", "lokr": "LoKrLayer"}[kind]
    assert any(tuner in [c.__name__ for c in type(m).__mro__] for m in method.unet.modules())
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n, p in method.unet.named_parameters() if p.requires_grad)
    losses = train_steps(method, make_batch(2), steps=4, lr=3e-3)
    assert losses[-1] < losses[0], losses
    method.export(tmp_path)
    method.unet.eval()
    expect = unet_out(method.unet)
    _loads_and_matches(tiny_sd15, tmp_path, LORA_WEIGHT_NAME, expect, method.unet)
    if kind == "dora":  # no kohya copy: its dora_scale layout is not what A1111 / ComfyUI agree on
        assert not (tmp_path / KOHYA_WEIGHT_NAME).exists()
    else:
        _loads_and_matches(tiny_sd15, tmp_path, KOHYA_WEIGHT_NAME, expect, method.unet)


def test_lcm_lora_with_loha_exports_a_loadable_lora(tiny_sd15, tmp_path):
    from ldmkit.methods.lcd import LCMLoraConfig, LCMLoraMethod

    mcfg = LCMLoraConfig(adapter="loha", lora_rank=2, lora_alpha=2.0, lora_target_modules=["to_q", "to_v", "conv1"])
    cfg = make_cfg(tiny_sd15, mcfg)
    cfg.data.resolution = 32
    method = LCMLoraMethod(cfg, accelerator())
    with torch.no_grad():  # LoHa starts as the base model (one factor zero): give the update a value
        for p in method.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    method.export(tmp_path)
    method.unet.eval()
    _loads_and_matches(tiny_sd15, tmp_path, LORA_WEIGHT_NAME, unet_out(method.unet), method.unet)
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()


def test_unknown_adapter_is_one_line():
    from ldmkit.errors import UserError
    from ldmkit.methods import load_config

    with pytest.raises(UserError, match="adapter"):
        load_config(None, ["--method.name=lora", "--method.adapter=ia3"])


def test_loha_kohya_copy_of_an_sdxl_layout_names_modules_as_the_lora_path(tiny_sdxl, tmp_path):
    """LoHa / LoKr kohya copies of SDXL models take the UNet's own config for their original-SD names, as the LoRA
    path does: on the tiny SDXL layout (not the released one) both name the same modules."""
    from safetensors.torch import load_file

    from ldmkit.lora.export import kohya_state_dict, layers_from_peft_model

    def kohya_modules(kind: str):
        mcfg = LoraMethodConfig(adapter=kind, lora_rank=2, lora_alpha=2.0, lora_target_modules=LCM_LORA_TARGETS)
        method = LoraMethod(make_cfg(tiny_sdxl, mcfg), accelerator())
        with torch.no_grad():  # LoHa starts as the base model (one factor zero): give the update a value
            for p in method.unet.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        method.export(tmp_path / kind)
        keys = load_file(tmp_path / kind / KOHYA_WEIGHT_NAME)
        return {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}, method

    lora, method = kohya_modules("lora")
    loha, _ = kohya_modules("loha")
    assert lora == loha and any("input_blocks" in m or "output_blocks" in m for m in lora)
    # negative control: with the released SDXL layout (what the LoHa path used) this UNet's modules get other
    # names, or none at all
    from ldmkit.errors import UserError

    try:
        layers = {"unet": layers_from_peft_model(method.unet)}
        released = {k.split(".")[0] for k in kohya_state_dict(layers, True, None)}
    except UserError:
        released = None
    assert released != lora
