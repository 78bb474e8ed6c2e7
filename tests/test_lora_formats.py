"""LoRA layouts, conversion, merging and the merge-lora / convert-lora commands, on tiny SD1.5/SDXL UNets.

Every load through stock diffusers counts the adapted modules (diffusers 0.42: a mixed file loads
only part of its modules with nothing but a warning, so "the output changed" proves nothing).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldmkit.errors import UserError
from ldmkit.lora import convert_cmd, formats, merge_cmd
from ldmkit.methods.lcd import LCM_LORA_TARGET_MODULES

from helpers.lcm import lora_unet, unet_inputs, unet_out


def cli(argv: list[str]) -> int:
    """Run ``ldmkit merge-lora|convert-lora ARGS`` through the modules' own add_arguments/run (as cli.py does),
    returning 2 on UserError like the CLI."""
    module = {"merge-lora": merge_cmd, "convert-lora": convert_cmd}[argv[0]]
    parser = argparse.ArgumentParser(prog=f"ldmkit {argv[0]}")
    module.add_arguments(parser)
    try:
        return module.run(parser.parse_args(argv[1:])) or 0
    except UserError:
        return 2


def _pipe(model_dir, sdxl: bool = False):
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return cls.from_pretrained(model_dir)


def _loaded(model_dir, lora, sdxl: bool = False):
    """Stock diffusers: a fresh pipeline with ``load_lora_weights(lora)``."""
    pipe = _pipe(model_dir, sdxl)
    pipe.load_lora_weights(str(lora))
    return pipe


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    """(peft UNet with rank 4, alpha 8 -> scale 2, its inputs, its output)."""
    unet = lora_unet(tiny_sd15, rank=4, alpha=8.0)
    inputs = unet_inputs(unet)
    return unet, inputs, unet_out(unet, inputs)


@pytest.fixture(scope="module")
def sd15_scale1(tiny_sd15):
    """alpha == rank: the stock save path (which drops alpha) is then exact."""
    unet = lora_unet(tiny_sd15, rank=4, alpha=4.0, seed=1)
    return unet, formats.layers_from_peft_model(unet)


def test_tiny_unet_has_every_lcm_lora_target_kind(sd15):
    unet = sd15[0]
    names = list(formats.layers_from_peft_model(unet))
    assert len(names) == formats.count_lora_modules(unet) > 0
    for target in LCM_LORA_TARGET_MODULES:
        assert any(n.endswith("." + target) for n in names), target


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_our_files_load_every_module_in_stock_pipeline(tmp_path, tiny_sd15, sd15, to):
    unet, inputs, expected = sd15
    path = formats.save_lora(formats.layers_from_peft_model(unet), tmp_path, to=to)
    assert path.name == (formats.LORA_WEIGHT_NAME if to == "diffusers" else formats.KOHYA_WEIGHT_NAME)
    pipe = _loaded(tiny_sd15, path)
    assert formats.count_lora_modules(pipe.unet) == formats.count_lora_modules(unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)


def test_kohya_keys_and_alpha(sd15):
    sd = formats.to_kohya(formats.layers_from_peft_model(sd15[0]))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert sd[f"{key}.lora_down.weight"].shape[0] == 4
    assert sd[f"{key}.alpha"].ndim == 0 and sd[f"{key}.alpha"].item() == 8.0
    assert all(k.startswith("lora_unet_") for k in sd)


def _same_weights(a: formats.Layers, b: formats.Layers, check_scale: bool = True):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name].down, b[name].down)
        torch.testing.assert_close(a[name].up, b[name].up)
        if check_scale:
            assert a[name].scale == pytest.approx(b[name].scale)


def test_reads_stock_reference_and_legacy_layouts(tmp_path, sd15_scale1):
    unet, ours = sd15_scale1
    peft_sd = get_peft_model_state_dict(unet)
    # what loads fully in diffusers 0.42: save_lora_weights(get_peft_model_state_dict(unet)) -> unet.<m>.lora_A.weight
    StableDiffusionPipeline.save_lora_weights(tmp_path / "stock", unet_lora_layers=peft_sd)
    _same_weights(formats.read_lora(formats.load_lora_file(tmp_path / "stock")), ours)
    # the reference LCM-LoRA script: a PeftModel's keys carry base_model.model.
    _same_weights(formats.read_lora({f"unet.base_model.model.{k}": v for k, v in peft_sd.items()}), ours)
    # peft keys with the adapter name, no unet. prefix
    _same_weights(formats.read_lora({k.replace(".weight", ".default.weight"): v for k, v in peft_sd.items()}), ours)
    # convert_state_dict_to_diffusers: attention as lora.down/up, the rest lora_A/B (a mixed file)
    _same_weights(
        formats.read_lora({f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_sd).items()}), ours
    )
    # old attention-processor keys
    old = {}
    for k, v in peft_sd.items():
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            if f".{proj}.lora_" in k:
                mod = k.split(f".{proj}.")[0]
                kind = "down" if "lora_A" in k else "up"
                k = f"{mod}.processor.{proj.replace('.0', '')}_lora.{kind}.weight"
        old[f"unet.{k}"] = v
    _same_weights(formats.read_lora(old), ours)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_mixed_and_prefixed_files_are_fixed_by_convert(tmp_path, tiny_sd15, sd15_scale1):
    unet, _ = sd15_scale1
    n = formats.count_lora_modules(unet)
    peft_sd = get_peft_model_state_dict(unet)
    mixed = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_sd).items()}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    stock = _loaded(tiny_sd15, tmp_path / "mixed.safetensors")
    assert formats.count_lora_modules(stock.unet) < n  # diffusers' silent partial load of a mixed file
    save_file(formats.convert(mixed, "diffusers"), str(tmp_path / "fixed.safetensors"))
    assert formats.count_lora_modules(_loaded(tiny_sd15, tmp_path / "fixed.safetensors").unet) == n

    prefixed = {f"unet.base_model.model.{k}": v for k, v in peft_sd.items()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(ValueError, match="not found in the base model"):  # stock diffusers rejects it
        _loaded(tiny_sd15, tmp_path / "prefixed.safetensors")
    assert (
        cli(
            [
                "convert-lora",
                "--in",
                str(tmp_path / "prefixed.safetensors"),
                "--to",
                "diffusers",
                "--out",
                str(tmp_path / "fixed2"),
            ]
        )
        == 0
    )
    pipe = _loaded(tiny_sd15, tmp_path / "fixed2")
    assert formats.count_lora_modules(pipe.unet) == n
    inputs = unet_inputs(unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(unet, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_kohya_names_resolve_without_the_model(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    resolve = formats._kohya_name_resolver(None)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert names and [resolve(n.replace(".", "_")) for n in names] == names


def test_paddlemix_file_merges_like_diffusers_fuse(tmp_path, tiny_sd15, sd15):
    """PaddleMIX lcm_lora.safetensors: kohya keys, 0-d alpha (8 for rank 4 here: scale 2), fp16 weights."""
    unet, inputs, expected = sd15
    paddle = {
        k: v.half() if k.endswith("weight") else v
        for k, v in formats.to_kohya(formats.layers_from_peft_model(unet)).items()
    }
    path = tmp_path / "lcm_lora.safetensors"
    save_file(paddle, str(path), metadata={"format": "pt"})

    ours = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    assert formats.merge_lora_into_unet(ours, formats.load_lora_file(path), scale=0.7) == formats.count_lora_modules(
        unet
    )
    pipe = _loaded(tiny_sd15, path)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    ref = pipe.unet.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_merged_unet_equals_lora_loaded_output(request, tmp_path, fixture):
    model_dir = request.getfixturevalue(fixture)
    unet = lora_unet(model_dir, rank=4, alpha=2.0, seed=2)
    inputs = unet_inputs(unet)
    expected = unet_out(unet, inputs)
    layers = formats.layers_from_peft_model(unet)
    path = formats.save_lora(layers, tmp_path, to="kohya")
    pipe = _loaded(model_dir, path, sdxl=fixture == "tiny_sdxl")
    assert formats.count_lora_modules(pipe.unet) == len(layers)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)
    plain = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    formats.merge_lora_into_unet(plain, layers)
    torch.testing.assert_close(unet_out(plain, inputs), expected, rtol=1e-4, atol=1e-5)


def test_round_trips(sd15):
    layers = formats.layers_from_peft_model(sd15[0])
    back = formats.read_lora(formats.convert(formats.to_kohya(layers), "kohya"))
    _same_weights(back, layers)
    # diffusers folds alpha/r into lora_B: same update, alpha = rank afterwards
    via_diffusers = formats.read_lora(formats.convert(formats.to_kohya(layers), "diffusers"))
    assert {round(layer.scale, 6) for layer in via_diffusers.values()} == {1.0}
    for name, layer in layers.items():
        torch.testing.assert_close(via_diffusers[name].delta(), layer.delta(), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_user_errors(tmp_path):
    w = torch.zeros(2, 3)
    cases = [
        {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": w},
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": w},
        {"unet.mid_block.attentions.0.proj_in.lora_A.weight": w},  # no up
        {
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": w,
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": w.T,
        },
        {"unet.something.weird": w},
        {"unet.a.lora_A.weight": torch.zeros(2, 3), "unet.a.lora_B.weight": torch.zeros(3, 4)},  # rank mismatch
    ]
    for sd in cases:
        with pytest.raises(UserError):
            formats.read_lora(sd)
    with pytest.raises(UserError):
        formats.load_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(UserError):
        formats.load_lora_file(tmp_path / "x.bin")
    with pytest.raises(UserError):
        formats.merge_lora_into_unet(
            torch.nn.Sequential(torch.nn.Linear(3, 2)), {"unet.1.lora_A.weight": w, "unet.1.lora_B.weight": w.T[:2, :2]}
        )
    assert (
        cli(["convert-lora", "--in", str(tmp_path / "nope.safetensors"), "--to", "kohya", "--out", str(tmp_path / "o")])
        == 2
    )


@pytest.mark.parametrize("command", ["merge-lora", "convert-lora"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli([command, "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_convert_cmd_with_model_names(tmp_path, tiny_sd15, sd15):
    unet, inputs, expected = sd15
    src = formats.save_lora(formats.layers_from_peft_model(unet), tmp_path / "src", to="kohya")
    out = tmp_path / "conv.safetensors"
    assert (
        cli(["convert-lora", "--in", str(src), "--to", "diffusers", "--out", str(out), "--model", str(tiny_sd15)]) == 0
    )
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(out)))
    pipe = _loaded(tiny_sd15, out)
    assert formats.count_lora_modules(pipe.unet) == formats.count_lora_modules(unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)


def test_merge_cmd(tmp_path, tiny_sd15, sd15):
    unet, inputs, expected = sd15
    lora_dir = tmp_path / "lora"
    formats.save_lora(formats.layers_from_peft_model(unet), lora_dir)
    LCMScheduler.from_config(
        _pipe(tiny_sd15).scheduler.config, original_inference_steps=25, timestep_scaling=5.0
    ).save_pretrained(lora_dir / "scheduler")
    assert cli(["merge-lora", "--model", str(tiny_sd15), "--lora", str(lora_dir), "--out", str(tmp_path / "m")]) == 0
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(unet_out(merged.unet, inputs), expected, rtol=1e-4, atol=1e-5)
    assert isinstance(merged.scheduler, LCMScheduler)
    assert merged.scheduler.config.original_inference_steps == 25 and merged.scheduler.config.timestep_scaling == 5.0
    merged.set_progress_bar_config(disable=True)
    image = merged(
        "a red circle",
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()

    assert (
        cli(
            [
                "merge-lora",
                "--model",
                str(tiny_sd15),
                "--lora",
                str(lora_dir),
                "--scale",
                "0",
                "--scheduler",
                "keep",
                "--out",
                str(tmp_path / "k"),
            ]
        )
        == 0
    )
    kept = json.loads((tmp_path / "k" / "scheduler" / "scheduler_config.json").read_text())
    assert kept["_class_name"] == "PNDMScheduler"
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    torch.testing.assert_close(
        unet_out(StableDiffusionPipeline.from_pretrained(tmp_path / "k").unet, inputs), unet_out(base, inputs)
    )
    assert (
        cli(["merge-lora", "--model", str(tmp_path / "nothing"), "--lora", str(lora_dir), "--out", str(tmp_path / "x")])
        == 2
    )
