"""LoRA layouts, conversion, merging and the merge-lora / convert-lora commands, on tiny SD1.5/SDXL models.

Every load through stock diffusers counts the adapted modules (a mixed file loads only part of its
modules with nothing but a warning, diffusers ``load_lora_adapter`` in ``src/diffusers/loaders/peft.py``
converts by the first key only, so "the output changed" proves nothing).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldmkit.commands import convert_lora as convert_cmd
from ldmkit.commands import merge_lora as merge_cmd
from ldmkit.errors import UserError
from ldmkit.lora import export, formats
from ldmkit.lora.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, layers_from_peft_model
from ldmkit.methods.lcd import LCM_LORA_TARGET_MODULES

from helpers.lcm import count_lora_modules, lora_unet, unet_inputs, unet_out


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
    return unet, layers_from_peft_model(unet)


def _unet_lora(component_layers: dict) -> export.Layers:
    return component_layers["unet"]


def _save_kohya(path, layers, sdxl: bool = False, unet_config=None):
    return export.save_kohya(path, {"unet": layers}, sdxl, unet_config)


def _save_diffusers(path, layers, sdxl: bool = False):
    return export.save_diffusers(path, {"unet": layers}, StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline)


def test_tiny_unet_has_every_lcm_lora_target_kind(sd15):
    unet = sd15[0]
    names = list(layers_from_peft_model(unet))
    assert len(names) == count_lora_modules(unet) > 0
    for target in LCM_LORA_TARGET_MODULES:
        assert any(n.endswith("." + target) for n in names), target


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_our_files_load_every_module_in_stock_pipeline(tmp_path, tiny_sd15, sd15, to):
    unet, inputs, expected = sd15
    save = _save_diffusers if to == "diffusers" else _save_kohya
    path = save(tmp_path, layers_from_peft_model(unet))
    assert path.name == (LORA_WEIGHT_NAME if to == "diffusers" else KOHYA_WEIGHT_NAME)
    pipe = _loaded(tiny_sd15, path)
    assert count_lora_modules(pipe.unet) == count_lora_modules(unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)


def test_kohya_keys_and_alpha(sd15):
    sd = export.kohya_state_dict({"unet": layers_from_peft_model(sd15[0])}, sdxl=False)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert sd[f"{key}.lora_down.weight"].shape[0] == 4
    assert sd[f"{key}.alpha"].ndim == 0 and sd[f"{key}.alpha"].item() == 8.0
    assert all(k.startswith("lora_unet_") for k in sd)
    te = {"q": export.LoraLayer(torch.zeros(2, 3), torch.zeros(3, 2))}
    assert next(iter(export.kohya_state_dict({"text_encoder": te}, sdxl=False))).startswith("lora_te_q.")
    sdxl = export.kohya_state_dict({"text_encoder": te, "text_encoder_2": te}, sdxl=True)
    assert {k.split("_q.")[0] for k in sdxl} == {"lora_te1", "lora_te2"}


def _same_weights(a: export.Layers, b: export.Layers, check_scale: bool = True):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name].down, b[name].down)
        torch.testing.assert_close(a[name].up, b[name].up)
        if check_scale:
            assert a[name].scale == pytest.approx(b[name].scale)


def _delta(layer: export.LoraLayer) -> torch.Tensor:
    down, up = layer.down.float().flatten(1), layer.up.float().flatten(1)
    return layer.scale * (up @ down)


def _read_unet(sd, **kw) -> export.Layers:
    components = formats.read_lora(sd, **kw)
    assert list(components) == ["unet"]
    return components["unet"]


def test_reads_stock_reference_and_legacy_layouts(tmp_path, sd15_scale1):
    unet, ours = sd15_scale1
    peft_sd = get_peft_model_state_dict(unet)
    # what diffusers' training scripts write: save_lora_weights(get_peft_model_state_dict(unet)) -> unet.<m>.lora_A.weight
    StableDiffusionPipeline.save_lora_weights(tmp_path / "stock", unet_lora_layers=peft_sd)
    _same_weights(_read_unet(formats.load_lora_file(tmp_path / "stock")), ours)
    # the reference LCM-LoRA script: a PeftModel's keys carry base_model.model.
    _same_weights(_read_unet({f"unet.base_model.model.{k}": v for k, v in peft_sd.items()}), ours)
    # peft keys with the adapter name, no unet. prefix
    _same_weights(_read_unet({k.replace(".weight", ".default.weight"): v for k, v in peft_sd.items()}), ours)
    # convert_state_dict_to_diffusers: attention as lora.down/up, the rest lora_A/B (a mixed file)
    _same_weights(_read_unet({f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_sd).items()}), ours)
    # old attention-processor keys
    old = {}
    for k, v in peft_sd.items():
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            if f".{proj}.lora_" in k:
                mod = k.split(f".{proj}.")[0]
                kind = "down" if "lora_A" in k else "up"
                k = f"{mod}.processor.{proj.replace('.0', '')}_lora.{kind}.weight"
        old[f"unet.{k}"] = v
    _same_weights(_read_unet(old), ours)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_mixed_and_prefixed_files_are_fixed_by_convert(tmp_path, tiny_sd15, sd15_scale1):
    unet, _ = sd15_scale1
    n = count_lora_modules(unet)
    peft_sd = get_peft_model_state_dict(unet)
    mixed = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_sd).items()}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    stock = _loaded(tiny_sd15, tmp_path / "mixed.safetensors")
    assert count_lora_modules(stock.unet) < n  # the silent partial load (module docstring)
    out = tmp_path / "fixed.safetensors"
    assert (
        cli(["convert-lora", "--in", str(tmp_path / "mixed.safetensors"), "--to", "diffusers", "--out", str(out)]) == 0
    )
    assert count_lora_modules(_loaded(tiny_sd15, out).unet) == n

    prefixed = {f"unet.base_model.model.{k}": v for k, v in peft_sd.items()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(ValueError, match="not found in the base model"):  # stock diffusers rejects it
        _loaded(tiny_sd15, tmp_path / "prefixed.safetensors")
    args = ["--in", str(tmp_path / "prefixed.safetensors"), "--to", "diffusers", "--out", str(tmp_path / "fixed2")]
    assert cli(["convert-lora", *args]) == 0
    pipe = _loaded(tiny_sd15, tmp_path / "fixed2")
    assert count_lora_modules(pipe.unet) == n
    inputs = unet_inputs(unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(unet, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_kohya_names_resolve_without_the_model(request, fixture):
    """diffusers' kohya converter maps our kohya names of every LCM-LoRA target back to the UNet's paths."""
    model_dir = request.getfixturevalue(fixture)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    targets = tuple("." + t for t in LCM_LORA_TARGET_MODULES)
    names = [
        n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(targets)
    ]
    layers = {n: export.LoraLayer(torch.zeros(1, 1), torch.zeros(1, 1)) for n in names}
    assert names and sorted(_read_unet(export.kohya_state_dict({"unet": layers}, sdxl=False))) == sorted(names)


def _paddlemix_file(path, unet):
    """PaddleMIX lcm_lora.safetensors: kohya keys, 0-d alpha (8 for rank 4 here: scale 2), fp16 weights."""
    kohya = export.kohya_state_dict({"unet": layers_from_peft_model(unet)}, sdxl=False)
    save_file(
        {k: v.half() if k.endswith("weight") else v for k, v in kohya.items()}, str(path), metadata={"format": "pt"}
    )
    return path


def _fused(model_dir, lora, scale: float = 1.0, sdxl: bool = False):
    """Stock diffusers: load_lora_weights + fuse_lora + unload_lora_weights."""
    pipe = _loaded(model_dir, lora, sdxl)
    pipe.fuse_lora(lora_scale=scale, components=["unet", "text_encoder"] + (["text_encoder_2"] if sdxl else []))
    pipe.unload_lora_weights()
    return pipe


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    ref = b.state_dict()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_paddlemix_file_merges_like_diffusers_fuse(tmp_path, tiny_sd15, sd15):
    path = _paddlemix_file(tmp_path / "lcm_lora.safetensors", sd15[0])
    ours = _pipe(tiny_sd15)
    assert merge_cmd.merge(ours, formats.load_lora_file(path), scale=0.7) == count_lora_modules(sd15[0])
    assert count_lora_modules(ours.unet) == 0
    _assert_same_weights(ours.unet, _fused(tiny_sd15, path, 0.7).unet)


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sdxl"])
def test_merged_unet_equals_lora_loaded_output(request, tmp_path, fixture):
    model_dir = request.getfixturevalue(fixture)
    sdxl = fixture == "tiny_sdxl"
    unet = lora_unet(model_dir, rank=4, alpha=2.0, seed=2)
    inputs = unet_inputs(unet)
    expected = unet_out(unet, inputs)
    layers = layers_from_peft_model(unet)
    path = _save_kohya(tmp_path, layers, sdxl, unet.config)
    pipe = _loaded(model_dir, path, sdxl=sdxl)
    assert count_lora_modules(pipe.unet) == len(layers)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)
    plain = _pipe(model_dir, sdxl)
    merge_cmd.merge(plain, formats.load_lora_file(path))
    torch.testing.assert_close(unet_out(plain.unet, inputs), expected, rtol=1e-4, atol=1e-5)


def test_round_trips(tmp_path, sd15):
    layers = layers_from_peft_model(sd15[0])
    kohya = _save_kohya(tmp_path / "a.safetensors", layers)
    assert cli(["convert-lora", "--in", str(kohya), "--to", "kohya", "--out", str(tmp_path / "b.safetensors")]) == 0
    _same_weights(_read_unet(load_file(str(tmp_path / "b.safetensors"))), layers)
    # diffusers folds alpha/r into lora_B: same update, alpha = rank afterwards
    assert cli(["convert-lora", "--in", str(kohya), "--to", "diffusers", "--out", str(tmp_path / "c")]) == 0
    via_diffusers = _read_unet(formats.load_lora_file(tmp_path / "c"))
    assert {round(layer.scale, 6) for layer in via_diffusers.values()} == {1.0}
    for name, layer in layers.items():
        torch.testing.assert_close(_delta(via_diffusers[name]), _delta(layer), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_user_errors(tmp_path, tiny_sd15):
    w = torch.zeros(2, 3)
    cases = [
        {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": w},  # no up
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": w},  # no up
        {"unet.mid_block.attentions.0.proj_in.lora_A.weight": w},  # no up
        {  # original SD block names without the model they are for
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": w,
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": w.T,
        },
        {"unet.something.weird": w},
        {"unet.a.lora_A.weight": torch.zeros(2, 3), "unet.a.lora_B.weight": torch.zeros(3, 4)},  # rank mismatch
        {"unet.a.lora_A.weight": w, "lora_unet_b.lora_down.weight": w},  # kohya mixed with peft keys
        {"unet.a.lora_A.weight": w, "unet.a.lora_B.weight": w.T, "unet.a.lora_magnitude_vector": w[0]},  # peft DoRA
        {},
    ]
    for sd in cases:
        with pytest.raises(UserError):
            formats.read_lora(sd)
    with pytest.raises(UserError):
        formats.load_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(UserError):
        formats.load_lora_file(tmp_path / "x.bin")
    with pytest.raises(UserError, match="not in the model"):
        merge_cmd.merge(_pipe(tiny_sd15), {"unet.no.such.lora_A.weight": w, "unet.no.such.lora_B.weight": w.T})
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
    src = _save_kohya(tmp_path / "src", layers_from_peft_model(unet))
    out = tmp_path / "conv.safetensors"
    assert (
        cli(["convert-lora", "--in", str(src), "--to", "diffusers", "--out", str(out), "--model", str(tiny_sd15)]) == 0
    )
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(out)))
    pipe = _loaded(tiny_sd15, out)
    assert count_lora_modules(pipe.unet) == count_lora_modules(unet)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, rtol=1e-5, atol=1e-5)
    bad = {
        "lora_unet_no_such_module.lora_down.weight": torch.zeros(2, 3),
        "lora_unet_no_such_module.lora_up.weight": torch.zeros(3, 2),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    args = [
        "--in",
        str(tmp_path / "bad.safetensors"),
        "--to",
        "diffusers",
        "--out",
        str(out),
        "--model",
        str(tiny_sd15),
    ]
    assert cli(["convert-lora", *args]) == 2


def test_merge_cmd(tmp_path, tiny_sd15, sd15):
    unet, inputs, expected = sd15
    lora_dir = tmp_path / "lora"
    _save_diffusers(lora_dir, layers_from_peft_model(unet))
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


def _random_lora(model, targets: list[str], seed: int) -> export.Layers:
    """A LoRA (rank 4, alpha 8) with random up weights on ``model`` (modified in place); its layers."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {
        k: export.LoraLayer(v.down.clone(), v.up.clone(), v.alpha) for k, v in layers_from_peft_model(model).items()
    }


def _sgm_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet path in original SD (sgm) block names, the inverse of diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers`` (src/diffusers/loaders/lora_conversion_utils.py) for the resnets
    and attentions of the blocks: ``down_blocks.1.attentions.0`` -> ``input_blocks.3.1`` when
    layers_per_block is 1."""
    n, inner = layers_per_block + 1, {"resnets": "0", "attentions": "1"}
    parts = module.split(".")
    if parts[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        return ".".join(["middle_block", str(index), *parts[3:]])
    block, kind, layer = int(parts[1]), parts[2], int(parts[3])
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str(1 + block * n + layer), inner[kind], *parts[4:]])
    assert parts[0] == "up_blocks", module
    return ".".join(["output_blocks", str(block * n + layer), inner[kind], *parts[4:]])


def _merged(tmp_path, model_dir, lora, *extra: str):
    out = tmp_path / f"merged-{lora.stem}"
    args = ["merge-lora", "--model", str(model_dir), "--lora", str(lora), "--scheduler", "keep", "--out", str(out)]
    assert cli([*args, *extra]) == 0
    return DiffusionPipeline.from_pretrained(out)


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


def test_sdxl_kohya_file_with_original_sd_block_names_and_text_encoders(tmp_path, tiny_sdxl):
    base = _pipe(tiny_sdxl, sdxl=True)
    layers = {
        "unet": _random_lora(base.unet, ATTENTION, 0),
        "text_encoder": _random_lora(base.text_encoder, TEXT, 1),
        "text_encoder_2": _random_lora(base.text_encoder_2, TEXT, 2),
    }
    lpb = base.unet.config.layers_per_block
    path = tmp_path / "sgm.safetensors"
    save_file(export.kohya_state_dict(layers, sdxl=True, unet_config=base.unet.config), str(path))
    keys = set(load_file(str(path)))
    # the SDXL kohya copy names UNet modules by their original SD blocks
    expected = {"lora_unet_" + _sgm_name(m, lpb).replace(".", "_") for m in layers["unet"]}
    assert {k.split(".")[0] for k in keys if k.startswith("lora_unet_")} == expected
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    # text-encoder modules under text_model_, as A1111 / ComfyUI / sd-scripts name them (transformers 5's
    # CLIPTextModel has no text_model in its module paths)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys

    stock = _loaded(tiny_sdxl, path, sdxl=True)  # diffusers reads every module of the file
    for c in layers:
        assert count_lora_modules(getattr(stock, c)) == len(layers[c]), c
    ref = _fused(tiny_sdxl, path, 0.6, sdxl=True)
    merged = _merged(tmp_path, tiny_sdxl, path, "--scale", "0.6")
    plain = _pipe(tiny_sdxl, sdxl=True)
    for c in layers:
        _assert_same_weights(getattr(merged, c), getattr(ref, c))
        assert any(
            not torch.equal(v, w) for v, w in zip(getattr(merged, c).parameters(), getattr(plain, c).parameters())
        )

    inputs = unet_inputs(stock.unet)
    for to in ("diffusers", "kohya"):
        out = tmp_path / f"conv-{to}.safetensors"
        assert cli(["convert-lora", "--in", str(path), "--to", to, "--out", str(out), "--model", str(tiny_sdxl)]) == 0
        conv = _loaded(tiny_sdxl, out, sdxl=True)
        for c in layers:
            assert count_lora_modules(getattr(conv, c)) == len(layers[c]), (to, c)
        torch.testing.assert_close(unet_out(conv.unet, inputs), unet_out(stock.unet, inputs), rtol=1e-5, atol=1e-5)
    # the block numbering depends on the UNet: without --model the names cannot be mapped
    assert cli(["convert-lora", "--in", str(path), "--to", "diffusers", "--out", str(tmp_path / "x.safetensors")]) == 2


def test_text_encoder_lora_files_merge_and_convert(tmp_path, tiny_sd15):
    base = _pipe(tiny_sd15)
    layers = {
        "unet": _random_lora(base.unet, ["to_q", "to_v"], 3),
        "text_encoder": _random_lora(base.text_encoder, TEXT, 4),
    }
    files = {
        "diffusers": export.save_diffusers(tmp_path / "d", layers, StableDiffusionPipeline),
        "kohya": export.save_kohya(tmp_path / "k", layers, sdxl=False),
    }
    assert any(k.startswith("text_encoder.") for k in load_file(str(files["diffusers"])))
    te_keys = {k.split(".")[0] for k in load_file(str(files["kohya"])) if k.startswith("lora_te_")}
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys), sorted(te_keys)[:3]
    plain = _pipe(tiny_sd15)
    for fmt, path in files.items():
        stock = _loaded(tiny_sd15, path)
        assert count_lora_modules(stock.text_encoder) == len(layers["text_encoder"]), fmt
        ref = _fused(tiny_sd15, path, 0.8)
        merged = _merged(tmp_path, tiny_sd15, path, "--scale", "0.8")
        _assert_same_weights(merged.unet, ref.unet)
        _assert_same_weights(merged.text_encoder, ref.text_encoder)
        assert any(
            not torch.equal(v, w) for v, w in zip(merged.text_encoder.parameters(), plain.text_encoder.parameters())
        )

        other = "kohya" if fmt == "diffusers" else "diffusers"
        out = tmp_path / f"{fmt}-to-{other}.safetensors"
        assert cli(["convert-lora", "--in", str(path), "--to", other, "--out", str(out)]) == 0
        conv = _loaded(tiny_sd15, out)
        assert count_lora_modules(conv.text_encoder) == len(layers["text_encoder"])
        assert count_lora_modules(conv.unet) == len(layers["unet"])
        ids = torch.tensor([[49406, 1, 2, 3, 49407]]) % conv.text_encoder.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(conv.text_encoder(ids)[0], stock.text_encoder(ids)[0], rtol=1e-5, atol=1e-5)


def test_flattened_1x1_conv_lora_loads_and_merges_like_the_conv_shaped_file(tmp_path, tiny_sd15):
    """SD1.x's proj_in is a 1x1 convolution; a LoRA with flat (linear) factors for it is the same map and loads
    (generate) and merges exactly as the conv-shaped file; factors of the wrong size are one line, exit 2."""
    from ldmkit.inference import load_lora

    base = _pipe(tiny_sd15)
    module = "down_blocks.0.attentions.0.proj_in"
    weight = base.unet.get_submodule(module).weight
    assert weight.shape[2:] == (1, 1)
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, weight.shape[1], generator=gen), torch.randn(weight.shape[0], 4, generator=gen)
    key = "lora_unet_" + module.replace(".", "_")
    files = {}
    for name, (d, u) in {"flat": (down, up), "conv": (down[:, :, None, None], up[:, :, None, None])}.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({f"{key}.lora_down.weight": d, f"{key}.lora_up.weight": u, f"{key}.alpha": torch.tensor(2.0)},
                  str(files[name]))  # fmt: skip
    merged = {name: _merged(tmp_path, tiny_sd15, path) for name, path in files.items()}
    _assert_same_weights(merged["flat"].unet, merged["conv"].unet)
    expected = weight + 0.5 * (up @ down)[:, :, None, None]
    torch.testing.assert_close(merged["flat"].unet.get_submodule(module).weight, expected)

    inputs = unet_inputs(base.unet)
    outs = []
    for path in files.values():
        pipe = _pipe(tiny_sd15)
        load_lora(pipe, path)
        assert count_lora_modules(pipe.unet) == 1
        outs.append(unet_out(pipe.unet, inputs))
    torch.testing.assert_close(outs[0], outs[1])

    wrong = tmp_path / "wrong.safetensors"
    save_file({f"{key}.lora_down.weight": down[:, :-1].contiguous(), f"{key}.lora_up.weight": up}, str(wrong))
    with pytest.raises(UserError, match="proj_in maps .* the LoRA is for another model"):
        load_lora(_pipe(tiny_sd15), wrong)
    assert cli(["merge-lora", "--model", str(tiny_sd15), "--lora", str(wrong), "--out", str(tmp_path / "w")]) == 2
