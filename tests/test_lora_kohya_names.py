"""The kohya copy's UNet module names: original-SD (SAI) block names for SDXL, diffusers names for SD1.5.

The expected original names are not taken from the writer: diffusers' single-file conversion
(``convert_ldm_unet_checkpoint``, src/diffusers/loaders/single_file_utils.py) maps an original-layout
checkpoint to diffusers keys, passing every tensor through unchanged. A checkpoint of a UNet's own tensors
under original names converts back to exactly that UNet's state dict (same keys, the very same tensor
objects) only if every name is the one the converter inverts; the expected LoRA module names are then read
off the converter's output by tensor identity.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint
from safetensors.torch import load_file

from ldmkit.commands import merge_lora as merge_cmd
from ldmkit.errors import UserError
from ldmkit.lora import export
from ldmkit.methods.lcd import LCM_LORA_TARGET_MODULES

from helpers.lcm import count_lora_modules, lora_unet

SDXL_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
"""stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the layout that matters here)."""
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
"""runwayml/stable-diffusion-v1-5's UNet: diffusers' defaults."""


def _lcm_lora_modules(unet) -> list[str]:
    """The modules LCM-LoRA adapts (peft matches a target as the whole name or its dotted suffix)."""
    return [n for n, _ in unet.named_modules() if any(n == t or n.endswith("." + t) for t in LCM_LORA_TARGET_MODULES)]


def _converter_names(unet) -> dict[str, str]:
    """{diffusers parameter key: original key} as diffusers' single-file conversion reads it (see the module
    docstring); fails unless the conversion gives back exactly the UNet's state dict."""
    sd = unet.state_dict()
    original = {export.original_sd_name(k, unet.config): v for k, v in sd.items()}
    assert len(original) == len(sd), "two parameters share an original name"
    converted = convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in original.items()}, dict(unet.config))
    assert set(converted) == set(sd)
    by_id = {id(v): k for k, v in original.items()}
    names = {k: by_id[id(converted[k])] for k in sd}
    assert all(converted[k] is sd[k] for k in sd), "a tensor came back under another key"
    return names


def _kohya_unet_names(state_dict) -> set[str]:
    return {k.split(".")[0] for k in state_dict if k.startswith("lora_unet_")}


def _expected_sgm(unet, modules) -> set[str]:
    names = _converter_names(unet)
    return {"lora_unet_" + names[m + ".weight"].removesuffix(".weight").replace(".", "_") for m in modules}


def test_full_sdxl_lcm_lora_uses_original_sd_names_and_sd15_keeps_diffusers_names():
    with init_empty_weights():
        sdxl, sd15 = UNet2DConditionModel(**SDXL_UNET), UNet2DConditionModel(**SD15_UNET)
    modules = _lcm_lora_modules(sdxl)
    assert len(modules) == 788
    layers = {m: export.LoraLayer(torch.zeros(1, 1), torch.zeros(1, 1)) for m in modules}
    written = _kohya_unet_names(export.kohya_state_dict({"unet": layers}, sdxl=True))  # SDXL default layout
    assert written == _expected_sgm(sdxl, modules)
    assert written == _kohya_unet_names(export.kohya_state_dict({"unet": layers}, sdxl=True, unet_config=sdxl.config))
    for name in (
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "input_blocks_4_0_in_layers_2",
        "input_blocks_4_0_emb_layers_1",
        "input_blocks_4_0_skip_connection",
        "input_blocks_3_0_op",
        "output_blocks_2_2_conv",
        "middle_block_1_transformer_blocks_9_ff_net_0_proj",
        "output_blocks_8_0_out_layers_3",
    ):
        assert "lora_unet_" + name in written, name
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block_" in n for n in written)

    modules = _lcm_lora_modules(sd15)
    assert len(modules) == 278
    layers = {m: export.LoraLayer(torch.zeros(1, 1), torch.zeros(1, 1)) for m in modules}
    written = _kohya_unet_names(export.kohya_state_dict({"unet": layers}, sdxl=False, unet_config=sd15.config))
    assert written == {"lora_unet_" + m.replace(".", "_") for m in modules}
    _converter_names(sd15)  # the same names function inverts SD1.5's conversion too (output_blocks_2_1_conv)
    assert export.original_sd_name("up_blocks.0.upsamplers.0.conv", sd15.config) == "output_blocks.2.1.conv"


def test_original_sd_name_refuses_what_has_no_such_name():
    with pytest.raises(UserError, match="no original-SD name"):
        export.original_sd_name("down_blocks.0.something.0.conv")
    with pytest.raises(UserError, match="layers_per_block"):
        export.original_sd_name("down_blocks.0.resnets.0.conv1", {"layers_per_block": [1, 2], "up_block_types": ()})


def _merge_cli(tmp_path, model_dir, lora, tag: str):
    out = tmp_path / f"merged-{tag}"
    parser = argparse.ArgumentParser()
    merge_cmd.add_arguments(parser)
    args = ["--model", str(model_dir), "--lora", str(lora), "--scheduler", "keep", "--out", str(out)]
    assert (merge_cmd.run(parser.parse_args(args)) or 0) == 0
    return DiffusionPipeline.from_pretrained(out)


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_exported_kohya_copy_names_loads_and_merges_like_the_diffusers_file(request, tmp_path, fixture):
    model_dir = request.getfixturevalue(fixture)
    sdxl = fixture == "tiny_sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    unet = lora_unet(model_dir, rank=4, alpha=2.0, seed=5)  # alpha != rank: the kohya copy keeps alpha
    n = export.export_lora(tmp_path / "lora", {"unet": unet}, cls)
    kohya = tmp_path / "lora" / export.KOHYA_WEIGHT_NAME
    modules = _lcm_lora_modules(unet)  # the peft wrappers keep the module names
    assert n == len(modules)
    written = _kohya_unet_names(load_file(str(kohya)))
    if sdxl:
        plain = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        assert written == _expected_sgm(plain, modules)
    else:
        assert written == {"lora_unet_" + m.replace(".", "_") for m in modules}

    stock = cls.from_pretrained(model_dir)
    stock.load_lora_weights(str(kohya))  # stock diffusers reads the kohya copy fully
    assert count_lora_modules(stock.unet) == n

    from_diffusers = _merge_cli(tmp_path, model_dir, tmp_path / "lora" / export.LORA_WEIGHT_NAME, "diffusers")
    from_kohya = _merge_cli(tmp_path, model_dir, kohya, "kohya")
    base = dict(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_parameters())
    ref = dict(from_diffusers.unet.named_parameters())
    changed = 0
    for k, v in from_kohya.unet.named_parameters():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, base[k])
    assert changed >= n  # every adapted weight moved
