"""The LoRA copies in the original layouts that ComfyUI, kohya sd-scripts and Forge read: FLUX.1's (Black Forest
Labs) and SD3's (SAI MMDiT).

- fused projections are exact: the written qkv / linear1 LoRA's update is the separate q, k, v (and proj_mlp)
  LoRAs' updates stacked, and the fused linear reproduces their outputs;
- every ``lora_unet_*`` module of the copy maps in the clients' key conversion, re-implemented here from their
  documented rules (not from ldmkit's writer): ComfyUI's ``model_lora_keys_unet`` (comfy/lora.py) and
  sd-scripts' ``lora_flux.py`` / ``lora_sd3.py`` name a module ``lora_unet_`` + its path in the original model
  with dots as underscores, the original model's linears (and their shapes) being those of flux/model.py or
  mmditx.py at the transformer config's depth and widths; a diffusers-named module fails the same check;
- stock diffusers (``FluxPipeline.load_lora_weights``, whose kohya FLUX reader assumes FLUX.1's 3072 / 12288
  widths) reads the FLUX copy with the diffusers file's output on a transformer of FLUX.1's width and one block
  of each kind, every module but BFL's top-level ones, which its converter drops;
- ldmkit reads either copy back to the adapted transformer, and ``ldmkit merge-lora`` merges it as the diffusers
  file, and ``ldmkit generate --lora`` samples with it (inference.load_lora hands diffusers the modules ldmkit read).
"""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.commands import merge_lora as merge_cmd
from ldmkit.families.flux import FLUX_LORA_TARGET_MODULES
from ldmkit.lora import export, formats

from helpers.lcm import count_lora_modules
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

RANK, ALPHA = 4, 8.0  # alpha != rank: the copy must fold the scale


def adapt(transformer, seed: int = 0):
    """``transformer`` with the family's LoRA targets adapted and random up weights (so the LoRA matters)."""
    transformer.add_adapter(
        LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(FLUX_LORA_TARGET_MODULES), init_lora_weights="gaussian"
        )
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return transformer.eval()


def lora_modules(transformer, adapter: str = "default") -> dict:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def inputs(config, seed: int = 0, tokens: int = 4, text: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
        img_ids=torch.stack([torch.zeros(tokens), torch.arange(tokens) // 2, torch.arange(tokens) % 2], dim=1),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )


@torch.no_grad()
def out(transformer, kw) -> torch.Tensor:
    return transformer(**kw)[0]


# ------------------------------------------------------------------------------- the clients' rules, re-implemented
def bfl_linears(config) -> dict[str, tuple[int, int]]:
    """{BFL module path: (out, in)} of every linear of the original FLUX model (black-forest-labs/flux
    src/flux/model.py, layers.py: DoubleStreamBlock, SingleStreamBlock, LastLayer, MLPEmbedder) at ``config``'s
    depth and widths. Written from that model's definition, independently of ldmkit.lora.flux_layout."""
    h = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * h  # mlp_ratio 4.0
    patch = config.in_channels
    out_ch = config.out_channels or config.in_channels
    names = {
        "img_in": (h, patch),
        "txt_in": (h, config.joint_attention_dim),
        "time_in.in_layer": (h, 256),
        "time_in.out_layer": (h, h),
        "vector_in.in_layer": (h, config.pooled_projection_dim),
        "vector_in.out_layer": (h, h),
        "final_layer.linear": (out_ch, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    if config.guidance_embeds:
        names.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for i in range(config.num_layers):
        for s in ("img", "txt"):
            names.update(
                {
                    f"double_blocks.{i}.{s}_mod.lin": (6 * h, h),
                    f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                    f"double_blocks.{i}.{s}_attn.proj": (h, h),
                    f"double_blocks.{i}.{s}_mlp.0": (mlp, h),
                    f"double_blocks.{i}.{s}_mlp.2": (h, mlp),
                }
            )
    for i in range(config.num_single_layers):
        names.update(
            {
                f"single_blocks.{i}.linear1": (3 * h + mlp, h),
                f"single_blocks.{i}.linear2": (h, h + mlp),
                f"single_blocks.{i}.modulation.lin": (3 * h, h),
            }
        )
    return names


def client_key_map(config) -> dict[str, str]:
    """ComfyUI (``model_lora_keys_unet``: every ``diffusion_model.<path>.weight`` -> ``lora_unet_<path, dots as
    underscores>``) and sd-scripts (``LORA_PREFIX_FLUX = "lora_unet"`` + "_" + module path, dots as underscores):
    kohya module name -> BFL module path."""
    return {"lora_unet_" + path.replace(".", "_"): path for path in bfl_linears(config)}


def unmapped(state_dict, config) -> list[str]:
    """The ``lora_unet_*`` modules of a kohya file that the clients cannot place, or whose shapes do not fit the
    weight they would be added to (ComfyUI adds ``up @ down`` to it)."""
    keys, shapes = client_key_map(config), bfl_linears(config)
    bad = []
    for key in state_dict:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        up, down = state_dict[f"{name}.lora_up.weight"], state_dict[key]
        if name not in keys or (up.shape[0], down.shape[1]) != shapes[keys[name]]:
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------------------------------- tests
@pytest.fixture
def tiny_export(tiny_flux, tmp_path):
    transformer = adapt(FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"), seed=3)
    n = export.export_lora(tmp_path / "lora", {"unet": transformer}, FluxPipeline)
    return transformer, n, tmp_path / "lora"


def test_fused_qkv_lora_reproduces_the_separate_q_k_v_loras(tiny_export):
    transformer, n, folder = tiny_export
    copy = load_file(str(folder / export.KOHYA_WEIGHT_NAME))
    peft = lora_modules(transformer)
    assert n == len(peft)
    cfg = transformer.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    fused = {
        **{
            f"lora_unet_double_blocks_{i}_img_attn_qkv": [f"transformer_blocks.{i}.attn.to_{p}" for p in "qkv"]
            for i in range(cfg.num_layers)
        },
        **{
            f"lora_unet_double_blocks_{i}_txt_attn_qkv": [f"transformer_blocks.{i}.attn.add_{p}_proj" for p in "qkv"]
            for i in range(cfg.num_layers)
        },
        **{
            f"lora_unet_single_blocks_{i}_linear1": [
                *(f"single_transformer_blocks.{i}.attn.to_{p}" for p in "qkv"),
                f"single_transformer_blocks.{i}.proj_mlp",
            ]
            for i in range(cfg.num_single_layers)
        },
    }
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(1))
    for name, parts in fused.items():
        down, up = copy[f"{name}.lora_down.weight"], copy[f"{name}.lora_up.weight"]
        alpha = float(copy[f"{name}.alpha"])
        assert down.shape[0] == RANK * len(parts) == alpha  # rank 3r (4r for linear1), scale folded in up
        delta = (alpha / down.shape[0]) * up @ down
        # 1. the fused update is the separate updates stacked along the output
        separate = torch.cat([peft[p].get_delta_weight("default") for p in parts])
        torch.testing.assert_close(delta, separate, rtol=1e-5, atol=1e-7)
        # 2. the fused, adapted linear (base weights concatenated as BFL's checkpoint has them) reproduces the
        # separate adapted projections' outputs
        base_w = torch.cat([peft[p].base_layer.weight for p in parts])
        base_b = torch.cat([peft[p].base_layer.bias for p in parts])
        with torch.no_grad():
            fused_out = torch.nn.functional.linear(x, base_w + delta, base_b)
            separate_out = torch.cat([peft[p](x) for p in parts], dim=-1)
        torch.testing.assert_close(fused_out, separate_out, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(separate_out, torch.nn.functional.linear(x, base_w, base_b))  # the LoRA matters


def test_the_copy_maps_every_module_in_comfyui_and_sd_scripts_names(tiny_export):
    transformer, n, folder = tiny_export
    copy = load_file(str(folder / export.KOHYA_WEIGHT_NAME))
    cfg = transformer.config
    modules = {k.removesuffix(".lora_down.weight") for k in copy if k.endswith(".lora_down.weight")}
    assert all(k.startswith("lora_unet_") for k in copy)
    assert len(copy) == 3 * len(modules)  # down, up, alpha per module
    assert unmapped(copy, cfg) == []  # 100% of the modules map
    # every diffusers module is in the copy: 12 per double block fuse to 8, 5 per single block to 2, proj_out
    assert len(modules) == 8 * cfg.num_layers + 2 * cfg.num_single_layers + 1
    assert n == 12 * cfg.num_layers + 5 * cfg.num_single_layers + 1
    # negative controls: diffusers-style names, a block the model lacks, a fused module of the wrong width
    one = next(iter(modules))
    for wrong, value in (
        ("lora_unet_transformer_blocks_0_attn_to_q", None),
        (f"lora_unet_double_blocks_{cfg.num_layers}_img_attn_qkv", None),
        ("lora_unet_double_blocks_0_img_attn_qkv", torch.zeros(RANK, 5)),
    ):
        bad = dict(copy)
        down = value if value is not None else copy[f"{one}.lora_down.weight"]
        bad[f"{wrong}.lora_down.weight"] = down
        bad[f"{wrong}.lora_up.weight"] = copy[f"{one}.lora_up.weight"][:, : down.shape[0]]
        assert unmapped(bad, cfg) == [wrong]


def test_ldmkit_reads_the_copy_back_to_the_same_transformer(tiny_flux, tiny_export):
    transformer, n, folder = tiny_export
    kw = inputs(transformer.config)
    ref = out(transformer, kw)
    results = {}
    for name in (export.LORA_WEIGHT_NAME, export.KOHYA_WEIGHT_NAME):
        pipe = FluxPipeline.from_pretrained(tiny_flux)
        components = formats.read_for_pipeline(pipe, load_file(str(folder / name)))
        assert set(components) == {"transformer"} and len(components["transformer"]) == n
        pipe.load_lora_weights(formats.peft_state_dict(components))
        assert count_lora_modules(pipe.transformer) == n
        results[name] = out(pipe.transformer, kw)
    torch.testing.assert_close(results[export.KOHYA_WEIGHT_NAME], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        results[export.KOHYA_WEIGHT_NAME], results[export.LORA_WEIGHT_NAME], rtol=1e-4, atol=1e-5
    )


FLUX1_WIDE = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""black-forest-labs/FLUX.1-dev's transformer config at one block of each kind (its widths: inner 3072, single-block
MLP 12288, which diffusers' kohya FLUX reader assumes)."""


def test_stock_diffusers_reads_the_copy_every_module_but_the_final_layer(tiny_flux, tmp_path):
    text = FluxPipeline.from_pretrained(tiny_flux, transformer=None)
    torch.manual_seed(0)
    wide = FluxTransformer2DModel(
        **FLUX1_WIDE,
        joint_attention_dim=text.text_encoder_2.config.d_model,
        pooled_projection_dim=text.text_encoder.config.hidden_size,
    )
    wide = adapt(wide, seed=7)
    n = export.export_lora(tmp_path / "lora", {"unet": wide}, FluxPipeline)
    kw = inputs(wide.config)
    ref = out(wide, kw)
    copy = load_file(str(tmp_path / "lora" / export.KOHYA_WEIGHT_NAME))
    assert unmapped(copy, wide.config) == []
    wide.delete_adapters("default")
    assert count_lora_modules(wide) == 0
    pipe = FluxPipeline.from_pretrained(tiny_flux, transformer=wide)
    # ldmkit's reader goes through diffusers' converter at these widths, and gets the LoRA's modules back
    components = formats.read_for_pipeline(pipe, copy)
    assert len(components["transformer"]) == n
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=export.KOHYA_WEIGHT_NAME, adapter_name="kohya")
    # Every module adapted but one: diffusers 0.42's converter emits BFL's top-level modules (final_layer.linear
    # -> proj_out) without the "transformer." prefix, and load_lora_adapter(prefix="transformer") drops them
    # silently. ComfyUI and sd-scripts apply it (test above), ldmkit's reader keeps it (read_for_pipeline).
    assert set(lora_modules(pipe.transformer, "kohya")) == set(components["transformer"]) - {"proj_out"}
    from_copy = out(pipe.transformer, kw)
    diffusers_file = load_file(str(tmp_path / "lora" / export.LORA_WEIGHT_NAME))
    without_top = {k: v for k, v in diffusers_file.items() if not k.startswith("transformer.proj_out.")}
    assert len(without_top) == len(diffusers_file) - 2
    pipe.load_lora_weights(without_top, adapter_name="diffusers")
    pipe.set_adapters(["diffusers"])
    torch.testing.assert_close(from_copy, out(pipe.transformer, kw), rtol=1e-4, atol=1e-4)
    # ldmkit's reading of the copy, every module: the adapted model's output
    pipe.delete_adapters(["kohya", "diffusers"])
    pipe.load_lora_weights(formats.peft_state_dict(components), adapter_name="ldmkit")
    assert count_lora_modules(pipe.transformer) == n
    torch.testing.assert_close(out(pipe.transformer, kw), ref, rtol=1e-4, atol=1e-4)


def _merge(model_dir, lora, out_dir):
    parser = argparse.ArgumentParser()
    merge_cmd.add_arguments(parser)
    args = ["--model", str(model_dir), "--lora", str(lora), "--scheduler", "keep", "--out", str(out_dir)]
    assert (merge_cmd.run(parser.parse_args(args)) or 0) == 0
    return DiffusionPipeline.from_pretrained(out_dir)


def test_merge_lora_takes_the_copy(tiny_flux, tiny_export, tmp_path):
    _, n, folder = tiny_export
    merged = {
        name: _merge(tiny_flux, folder / name, tmp_path / f"merged-{i}")
        for i, name in enumerate((export.LORA_WEIGHT_NAME, export.KOHYA_WEIGHT_NAME))
    }
    ref = dict(merged[export.LORA_WEIGHT_NAME].transformer.named_parameters())
    base = dict(FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").named_parameters())
    changed = 0
    for k, v in merged[export.KOHYA_WEIGHT_NAME].transformer.named_parameters():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, base[k])
    assert changed >= n


def test_generate_takes_the_copy(tiny_flux, tiny_export, tmp_path):
    _, _, folder = tiny_export
    gen = tmp_path / "gen"
    argv = ["generate", "--model", str(tiny_flux), "--lora", str(folder / export.KOHYA_WEIGHT_NAME), "--prompt", "x"]
    assert main([*argv, "--steps", "2", "--height", "32", "--width", "32", "--out", str(gen)]) == 0
    assert (gen / "000.png").is_file()


# ----------------------------------------------------------------------------------------------------- SD3 / SD3.5
def sai_linears(config) -> dict[str, tuple[int, int]]:
    """{MMDiT module path: (out, in)} of every linear of SAI's MMDiT (sd3-ref mmditx.py: DismantledBlock with
    ``attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2`` / ``adaLN_modulation.1``, SD3.5's ``attn2`` in
    the x_block of dual-attention blocks (9 modulation chunks), the last context block pre-only (its modulation:
    2 chunks), TimestepEmbedder / VectorEmbedder ``mlp.0`` / ``mlp.2``, FinalLayer) at ``config``'s depth and
    widths. Written from that model's definition, independently of ldmkit.lora.sd3_layout."""
    h = config.num_attention_heads * config.attention_head_dim
    n = config.num_layers
    dual = set(config.dual_attention_layers or ())
    names = {
        "context_embedder": (config.caption_projection_dim, config.joint_attention_dim),
        "t_embedder.mlp.0": (h, 256),
        "t_embedder.mlp.2": (h, h),
        "y_embedder.mlp.0": (h, config.pooled_projection_dim),
        "y_embedder.mlp.2": (h, h),
        "final_layer.linear": (config.patch_size**2 * config.out_channels, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    for i in range(n):
        x, c = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        names.update(
            {
                f"{x}.attn.qkv": (3 * h, h),
                f"{x}.attn.proj": (h, h),
                f"{x}.mlp.fc1": (4 * h, h),
                f"{x}.mlp.fc2": (h, 4 * h),
                f"{x}.adaLN_modulation.1": ((9 if i in dual else 6) * h, h),
                f"{c}.attn.qkv": (3 * h, h),
                f"{c}.adaLN_modulation.1": ((2 if i == n - 1 else 6) * h, h),
            }
        )
        if i in dual:
            names.update({f"{x}.attn2.qkv": (3 * h, h), f"{x}.attn2.proj": (h, h)})
        if i < n - 1:
            names.update({f"{c}.attn.proj": (h, h), f"{c}.mlp.fc1": (4 * h, h), f"{c}.mlp.fc2": (h, 4 * h)})
    return names


def sd3_unmapped(state_dict, config) -> list[str]:
    """As ``unmapped``, by the rule sd-scripts' lora_sd3.py (``lora_unet`` + "_" + MMDiT module path, dots as
    underscores) and ComfyUI's ``model_lora_keys_unet`` share."""
    shapes = sai_linears(config)
    keys = {"lora_unet_" + path.replace(".", "_"): path for path in shapes}
    bad = []
    for key in state_dict:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up, down = state_dict[f"{name}.lora_up.weight"], state_dict[key]
            if name not in keys or (up.shape[0], down.shape[1]) != shapes[keys[name]]:
                bad.append(name)
    return bad


def sd3_inputs(config, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = config.sample_size
    return dict(
        hidden_states=torch.randn(1, config.in_channels, s, s, generator=g),
        encoder_hidden_states=torch.randn(1, 6, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )


def test_sd3_copy_fuses_qkv_exactly_maps_every_module_and_reads_back(tiny_sd3, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from ldmkit.families.sd3 import SD3_LORA_TARGET_MODULES

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(SD3_LORA_TARGET_MODULES), init_lora_weights="gaussian")
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    transformer.eval()
    n = export.export_lora(tmp_path / "lora", {"unet": transformer}, StableDiffusion3Pipeline)
    copy = load_file(str(tmp_path / "lora" / export.KOHYA_WEIGHT_NAME))
    cfg = transformer.config
    peft = lora_modules(transformer)
    assert n == len(peft)
    # fused qkv of both streams and of SD3.5's attn2: the separate updates stacked
    for i in range(cfg.num_layers):
        fused = {
            f"lora_unet_joint_blocks_{i}_x_block_attn_qkv": [f"transformer_blocks.{i}.attn.to_{p}" for p in "qkv"],
            f"lora_unet_joint_blocks_{i}_context_block_attn_qkv": [
                f"transformer_blocks.{i}.attn.add_{p}_proj" for p in "qkv"
            ],
        }
        if i in cfg.dual_attention_layers:
            fused[f"lora_unet_joint_blocks_{i}_x_block_attn2_qkv"] = [
                f"transformer_blocks.{i}.attn2.to_{p}" for p in "qkv"
            ]
        for name, parts in fused.items():
            down, up, alpha = (
                copy[f"{name}.lora_down.weight"],
                copy[f"{name}.lora_up.weight"],
                float(copy[f"{name}.alpha"]),
            )
            assert down.shape[0] == 3 * RANK == alpha
            separate = torch.cat([peft[p].get_delta_weight("default") for p in parts])
            torch.testing.assert_close((alpha / down.shape[0]) * up @ down, separate, rtol=1e-5, atol=1e-7)
    # 100% of the modules map in sd-scripts' / ComfyUI's names; diffusers-style names do not
    assert sd3_unmapped(copy, cfg) == []
    bad = dict(copy)
    bad["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"] = torch.zeros(RANK, 32)
    bad["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"] = torch.zeros(32, RANK)
    assert sd3_unmapped(bad, cfg) == ["lora_unet_transformer_blocks_0_attn_to_q"]
    # ldmkit reads the copy back to the adapted transformer (diffusers has no reader for the SAI layout)
    kw = sd3_inputs(cfg)
    ref = out(transformer, kw)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    components = formats.read_for_pipeline(pipe, copy)
    assert set(components) == {"transformer"} and len(components["transformer"]) == n
    pipe.load_lora_weights(formats.peft_state_dict(components))
    assert count_lora_modules(pipe.transformer) == n
    torch.testing.assert_close(out(pipe.transformer, kw), ref, rtol=1e-4, atol=1e-5)
    # merge-lora with the copy = with the diffusers file
    merged = [
        _merge(tiny_sd3, tmp_path / "lora" / name, tmp_path / f"merged-{i}")
        for i, name in enumerate((export.LORA_WEIGHT_NAME, export.KOHYA_WEIGHT_NAME))
    ]
    ref_params = dict(merged[0].transformer.named_parameters())
    for k, v in merged[1].transformer.named_parameters():
        torch.testing.assert_close(v, ref_params[k], rtol=1e-5, atol=1e-6, msg=k)


def _delta(layer) -> torch.Tensor:
    return layer.scale * layer.up.float() @ layer.down.float()


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_every_linear_round_trips_and_adaln_halves_swap_as_diffusers_converts_weights(arch, request):
    """A LoRA on every linear of the transformer (the AdaLN modulations included, which no ldmkit recipe
    adapts) survives the original layout and back exactly; the final (and SD3's last context) AdaLN's update is
    swapped as diffusers' checkpoint converter swaps the weight (``swap_scale_shift``)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    from ldmkit.lora import flux_layout, sd3_layout
    from ldmkit.lora.layers import LoraLayer

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    cls = FluxTransformer2DModel if arch == "flux" else SD3Transformer2DModel
    transformer = cls.from_pretrained(model_dir, subfolder="transformer")
    layout = flux_layout.flux_layout if arch == "flux" else sd3_layout.sd3_layout
    g = torch.Generator().manual_seed(4)
    layers = {
        name: LoraLayer(torch.randn(3, m.in_features, generator=g), torch.randn(m.out_features, 3, generator=g), 6.0)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    original = flux_layout.fuse(layers, layout(transformer.config), arch)
    back = flux_layout.split(original, layout(transformer.config))
    assert set(back) == set(layers)
    for name, layer in layers.items():
        torch.testing.assert_close(_delta(back[name]), _delta(layer), rtol=1e-5, atol=1e-5, msg=name)
    swapped = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
    if arch == "sd3":
        last = transformer.config.num_layers - 1
        swapped[f"joint_blocks.{last}.context_block.adaLN_modulation.1"] = (
            f"transformer_blocks.{last}.norm1_context.linear"
        )
    for name, diffusers_name in swapped.items():
        torch.testing.assert_close(swap_scale_shift(_delta(original[name])), _delta(layers[diffusers_name]))


def test_a_fused_lora_with_one_down_as_sd_scripts_trains_reads_exactly(tiny_flux):
    """sd-scripts trains img_attn.qkv / linear1 as one LoRA (one down for q, k, v): ldmkit gives every part the
    whole down and its rows of the up."""
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    cfg = pipe.transformer.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(4, h, generator=g), torch.randn(3 * h + 4 * h, 4, generator=g)
    state = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0),
    }
    layers = formats.read_for_pipeline(pipe, state)["transformer"]
    parts = [f"single_transformer_blocks.0.attn.to_{p}" for p in "qkv"] + ["single_transformer_blocks.0.proj_mlp"]
    assert sorted(layers) == sorted(parts)
    torch.testing.assert_close(torch.cat([_delta(layers[p]) for p in parts]), 0.5 * up @ down, rtol=1e-5, atol=1e-5)


def test_text_encoder_and_lycoris_adapters_get_the_copy_too(tiny_flux, tmp_path):
    """A CLIP LoRA goes to sd-scripts' ``lora_te1_text_model_*`` names (whatever transformers' module paths) and reads back onto the pipeline's encoder; a LoHa
    (written as an exact LoRA by SVD) gets the same BFL-layout copy, every module mapped."""
    from transformers import CLIPTextModel

    from ldmkit.lora.adapters import export_adapter

    transformer = adapt(FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"), seed=8)
    clip = CLIPTextModel.from_pretrained(tiny_flux, subfolder="text_encoder")
    clip.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    n, files = export_adapter(tmp_path / "lora", {"unet": transformer, "text_encoder": clip}, FluxPipeline, "lora")
    copy = load_file(str(tmp_path / "lora" / export.KOHYA_WEIGHT_NAME))
    te = {k for k in copy if k.startswith("lora_te1_text_model_encoder_layers_") and k.endswith(".lora_down.weight")}
    assert len(te) == 2 * clip.config.num_hidden_layers
    assert unmapped({k: v for k, v in copy.items() if k.startswith("lora_unet_")}, transformer.config) == []
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    components = formats.read_for_pipeline(pipe, copy)
    assert len(components["text_encoder"]) == len(te) and sum(map(len, components.values())) == n
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        ref = clip(ids).pooler_output
        pipe.load_lora_weights(formats.peft_state_dict(components))
        torch.testing.assert_close(pipe.text_encoder(ids).pooler_output, ref, rtol=1e-4, atol=1e-5)

    from peft import LoHaConfig

    loha = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    loha.add_adapter(LoHaConfig(r=2, alpha=2, target_modules=list(FLUX_LORA_TARGET_MODULES), init_weights=False))
    n, files = export_adapter(tmp_path / "loha", {"unet": loha}, FluxPipeline, "loha")
    assert export.KOHYA_WEIGHT_NAME in files
    copy = load_file(str(tmp_path / "loha" / export.KOHYA_WEIGHT_NAME))
    assert unmapped(copy, loha.config) == [] and len(copy) == 3 * 13
