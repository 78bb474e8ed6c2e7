"""Single original-layout FLUX.1 / SD3 transformer files (what ComfyUI users keep), with the other parts from a
diffusers folder (model.components_from): ldmkit's hand-written diffusers -> original writer is the exact inverse
of diffusers' reader at the released sizes, the tiny twins' files round-trip to the same outputs, the family is
detected from the keys, and such a file trains an LCM-LoRA (debug recipe) and generates."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import load_file, save_file

from ldmkit.cli import main
from ldmkit.errors import UserError
from ldmkit.families import FluxFamily, SD3Family, detect_family
from ldmkit.families.configs import FLUX_DEV, SD35_MEDIUM
from ldmkit.families.hub import resolve_model
from ldmkit.families.transformer_file import KINDS, save_transformer_file, to_original

from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)


def row_labels(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as a [rows, 1...] tensor of its own global row numbers: the conversions only split, concatenate
    and swap rows, so where each row lands shows the mapping without materialising a 12B model."""
    out, n = {}, 0
    for key, value in model.state_dict().items():
        rows = value.shape[0] if value.ndim else 1
        out[key] = torch.arange(n, n + rows).view(rows, *([1] * (value.ndim - 1)))
        n += rows
    return out


@pytest.mark.parametrize(
    "cls, config, kind, reader",
    [
        (diffusers.FluxTransformer2DModel, FLUX_DEV, "flux", convert_flux_transformer_checkpoint_to_diffusers),
        (diffusers.SD3Transformer2DModel, SD35_MEDIUM, "sd3", convert_sd3_transformer_checkpoint_to_diffusers),
    ],
    ids=["flux1-dev", "sd35-medium"],
)
def test_writer_is_the_inverse_of_diffusers_reader_at_released_sizes(cls, config, kind, reader):
    """diffusers' own single-file reader, applied to what ldmkit writes, gives back every weight's rows in place
    (1160 FLUX.1-dev / 909 SD3.5 Medium tensors, full size on the meta device for the shapes)."""
    with torch.device("meta"):
        model = cls(**config)
    labels = row_labels(model)
    original = to_original(labels, dict(model.config), kind)
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks")) for k in original)
    back = reader(dict(original))
    assert set(back) == set(labels)
    assert all(torch.equal(back[k].flatten(), labels[k].flatten()) for k in labels)
    # Negative control: without the AdaLN half swap the reader's rows land elsewhere.
    broken = dict(original)
    w = broken["final_layer.adaLN_modulation.1.weight"]
    broken["final_layer.adaLN_modulation.1.weight"] = torch.cat(w.chunk(2)[::-1])
    assert not torch.equal(
        reader(broken)["norm_out.linear.weight"].flatten(), labels["norm_out.linear.weight"].flatten()
    )


def outputs_of(transformer, arch: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    if arch == "sd3":
        kwargs = dict(
            hidden_states=torch.randn(1, 16, 4, 4, generator=g),
            encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor([500.0]),
        )
    else:
        kwargs = dict(
            hidden_states=torch.randn(1, 4, 64, generator=g),
            encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(4, 3),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.tensor([3.5]),
        )
    with torch.no_grad():
        return transformer(**kwargs, return_dict=False)[0]


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_tiny_file_round_trips_to_the_same_outputs(arch, request, tmp_path, monkeypatch):
    """``tiny-model --single-file`` writes the original layout (BFL / SAI names); model.pretrained=<file> with
    model.components_from=<folder> resolves to a folder whose transformer gives the original's outputs exactly
    (SD3: diffusers' from_single_file; FLUX: ldmkit splits the tiny widths, diffusers' reader assumes FLUX.1's
    3072), and the family is detected from the keys. Negative control: a file with one fused projection's q and
    k swapped loads but gives other outputs."""
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    folder, file = tmp_path / "tiny", tmp_path / f"{arch}.safetensors"
    assert main(["tiny-model", "--arch", arch, "--out", str(folder), "--single-file", str(file)]) == 0
    keys = set(load_file(str(file)))
    assert any(k.startswith("joint_blocks." if arch == "sd3" else "double_blocks.") for k in keys)
    assert detect_family(file) is (SD3Family if arch == "sd3" else FluxFamily)
    cls = getattr(diffusers, KINDS[arch][2])
    reference = outputs_of(cls.from_pretrained(folder, subfolder="transformer"), arch)
    root = resolve_model(file, components_from=str(folder))
    assert json.loads((root / "model_index.json").read_text()) == json.loads((folder / "model_index.json").read_text())
    assert torch.equal(outputs_of(cls.from_pretrained(root, subfolder="transformer"), arch), reference)

    sd = load_file(str(file))
    qkv = "joint_blocks.0.x_block.attn.qkv.weight" if arch == "sd3" else "double_blocks.0.img_attn.qkv.weight"
    q, k, v = sd[qkv].chunk(3)
    sd[qkv] = torch.cat([k, q, v])
    save_file(sd, str(tmp_path / "broken.safetensors"))
    broken = resolve_model(tmp_path / "broken.safetensors", components_from=str(folder))
    assert not torch.allclose(outputs_of(cls.from_pretrained(broken, subfolder="transformer"), arch), reference)


def test_components_of_another_family_or_none_stop_with_one_line(tiny_sd3, tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    file = tmp_path / "flux.safetensors"
    assert main(["tiny-model", "--arch", "flux", "--out", str(tmp_path / "f"), "--single-file", str(file)]) == 0
    with pytest.raises(UserError, match="is not a FluxPipeline folder"):
        resolve_model(file, components_from=str(tiny_sd3))
    with pytest.raises(UserError, match=r"set model.components_from .* or put black-forest-labs/FLUX.1-dev"):
        resolve_model(file)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_single_file_trains_an_lcm_lora_and_generates(arch, shapes_folder, tmp_path, monkeypatch, capsys):
    """The debug recipe on model.pretrained=<original-layout file> + model.components_from trains (the loss is
    finite), exports a LoRA that loads on the file again, and `ldmkit generate` samples from it."""
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    folder, file = tmp_path / "tiny", tmp_path / f"{arch}.safetensors"
    assert main(["tiny-model", "--arch", arch, "--out", str(folder), "--single-file", str(file)]) == 0
    run = tmp_path / "run"
    argv = [
        "train", f"configs/lcm_lora/debug_{arch}.yaml", f"--model.pretrained={file}",
        f"--model.components_from={folder}", f"--data.path={shapes_folder}", "--data.max_samples=8",
        "--train.max_steps=2", "--train.checkpoint_every=0", "--train.report_to=none", f"--output_dir={run}",
        "--method.validation_steps=[1]",
    ]  # fmt: skip
    assert main(argv) == 0
    assert f"--components-from {folder}" in capsys.readouterr().out  # the "try it" line names the components
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    card = (run / "export" / "README.md").read_text()
    assert "## Use it in ComfyUI / Forge" in card and "A1111" not in card  # A1111 runs no FLUX / SD3
    out = tmp_path / "gen"
    gen = ["generate", "--model", str(file), "--components-from", str(folder), "--lora", str(run / "export")]
    assert main([*gen, "--prompt", "a red circle", "--steps", "2", "--out", str(out)]) == 0
    assert (out / "000.png").is_file()


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_convert_lora_round_trips_flow_loras_through_the_original_layout(arch, request, tmp_path, capsys):
    """``convert-lora --model <FLUX/SD3 folder>``: diffusers -> original (BFL / SAI) writes the copy ``ldmkit train``
    writes, tensor for tensor, and original -> diffusers gives back every module's update (up @ down * scale)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig

    from ldmkit.families.flux import FLUX_LORA_TARGET_MODULES
    from ldmkit.families.sd3 import SD3_LORA_TARGET_MODULES
    from ldmkit.lora import export, formats

    folder = request.getfixturevalue(f"tiny_{arch}")
    cls = getattr(diffusers, KINDS[arch][2])
    transformer = cls.from_pretrained(folder, subfolder="transformer")
    targets = SD3_LORA_TARGET_MODULES if arch == "sd3" else FLUX_LORA_TARGET_MODULES
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=list(targets)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pipeline_cls = StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline
    export.export_lora(tmp_path / "lora", {"transformer": transformer}, pipeline_cls)
    diffusers_file = tmp_path / "lora" / export.LORA_WEIGHT_NAME

    kohya = tmp_path / "kohya.safetensors"
    assert (
        main(
            ["convert-lora", "--in", str(diffusers_file), "--to", "kohya", "--model", str(folder), "--out", str(kohya)]
        )
        == 0
    )
    written, shipped = load_file(str(kohya)), load_file(str(tmp_path / "lora" / export.KOHYA_WEIGHT_NAME))
    assert set(written) == set(shipped) and all(torch.equal(written[k], shipped[k]) for k in shipped)
    prefix = "lora_unet_joint_blocks_" if arch == "sd3" else "lora_unet_double_blocks_"
    assert any(k.startswith(prefix) for k in written)

    back = tmp_path / "back.safetensors"
    assert (
        main(["convert-lora", "--in", str(kohya), "--to", "diffusers", "--model", str(folder), "--out", str(back)]) == 0
    )

    def updates(path):
        layers = formats.read_lora(load_file(str(path)))["transformer"]
        return {m: layer.folded_up().float() @ layer.down.float() for m, layer in layers.items()}

    a, b = updates(diffusers_file), updates(back)
    assert set(a) == set(b) and len(a) > 10
    assert all(torch.allclose(a[m], b[m], atol=1e-6) for m in a)
    assert (
        main(["convert-lora", "--in", str(kohya), "--to", "diffusers", "--out", str(tmp_path / "x.safetensors")]) == 2
    )
    assert "FLUX / SD3 LoRA: give the model it is for (--model" in capsys.readouterr().err
