"""Memory levers of the flow recipes: the frozen base in 8 / 4 bits (model.quantize, torchao) trains an LCM-LoRA on
the tiny FLUX.1-dev twin with an export of the same modules, a method without a frozen base refuses it, a missing
torchao says how to install it; the full-size recipes and their memory benchmark agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.errors import UserError
from ldmkit.methods import load_config

from helpers.lcm import fixed_batch, make_distill_method, train_steps
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).parent.parent


def quantised_linears(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_base_trains_an_lcm_lora(mode, tiny_flux, tmp_path):
    """The frozen base's linears hold torchao tensors, the LoRA trains on them (peft's TorchaoLoraLinear) in fp32,
    and the loss on a fixed batch is finite and goes down."""
    pytest.importorskip("torchao")
    m = make_distill_method("lcm_lora", tiny_flux, tmp_path, f"--model.quantize={mode}", "--method.loss_type=l2")
    assert quantised_linears(m.unet) > 10
    assert all(p.dtype == torch.float32 for p in m.parameters())
    losses = train_steps(m, fixed_batch(), steps=6, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_quantised_run_exports_the_same_lora_modules(tiny_flux, shapes_folder, tmp_path):
    """The debug recipe with model.quantize=int8 exports a LoRA of the same keys and shapes as without."""
    pytest.importorskip("torchao")
    exports = {}
    for name, extra in (("bf16", []), ("int8", ["--model.quantize=int8"])):
        run = tmp_path / name
        argv = [
            "train", "configs/lcm_lora/debug_flux.yaml", f"--model.pretrained={tiny_flux}",
            f"--data.path={shapes_folder}", "--data.max_samples=8", "--train.max_steps=2",
            "--train.checkpoint_every=0", "--train.report_to=none", "--train.validate_every=0",
            f"--output_dir={run}", *extra,
        ]  # fmt: skip
        assert main(argv) == 0
        exports[name] = load_file(str(run / "export" / "pytorch_lora_weights.safetensors"))
    assert {k: v.shape for k, v in exports["int8"].items()} == {k: v.shape for k, v in exports["bf16"].items()}


def test_quantize_needs_a_lora_method_and_torchao(tiny_flux, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="trains the whole denoiser: use a LoRA method"):
        load_config(None, ["--method.name=lcd", f"--model.pretrained={tiny_flux}", "--model.quantize=int8"])
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    from ldmkit.families.quantize import quantize_weights

    with pytest.raises(UserError, match=r"needs torchao, which is not installed: pip install 'ldmkit\[quant\]'"):
        quantize_weights(torch.nn.Linear(4, 4), "int8")


FSDP = ROOT / "configs" / "accelerate" / "fsdp" / "fsdp_flux.yaml"


def test_fsdp_config_wraps_the_transformer_blocks(tiny_flux, tiny_sd3):
    """The shipped FSDP config wraps every block class of both flow families (the classes exist in diffusers and
    are the blocks of the tiny twins), FSDP version 2."""
    import diffusers
    import yaml

    cfg = yaml.safe_load(FSDP.read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    wrapped = set(cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))
    for folder, cls in ((tiny_flux, diffusers.FluxTransformer2DModel), (tiny_sd3, diffusers.SD3Transformer2DModel)):
        model = cls.from_pretrained(folder, subfolder="transformer")
        blocks = {type(b).__name__ for name in ("transformer_blocks", "single_transformer_blocks")
                  for b in getattr(model, name, [])}  # fmt: skip
        assert blocks and blocks <= wrapped


@pytest.mark.slow
def test_fsdp_trains_the_whole_flux_transformer_on_two_cpu_processes(tiny_flux, shapes_folder, tmp_path):
    """The shipped FSDP config, launched with 2 CPU processes (gloo), fully fine-tunes the tiny FLUX twin (the
    sharded path a full distillation of a 12B model takes): the run finishes, and its export is a stock
    FluxPipeline folder whose transformer moved from the base and is finite."""
    import os
    import subprocess

    import diffusers

    from helpers.runs import launch_two

    launch = launch_two()
    port = launch[launch.index("--main_process_port") + 1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "--num_processes", "2",
        "--cpu", "--mixed_precision", "no", "--main_process_port", port, "-m", "ldmkit", "train",
        "configs/finetune/debug_flux.yaml", f"--model.pretrained={tiny_flux}", f"--data.path={shapes_folder}",
        "--train.max_steps=2", "--train.checkpoint_every=0", "--train.report_to=none", "--train.validate_every=0",
        f"--output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"LDMKIT_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    base = diffusers.FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").state_dict()
    pipe = diffusers.FluxPipeline.from_pretrained(tmp_path / "run" / "export")
    trained = pipe.transformer.state_dict()
    assert set(trained) == set(base)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], base[k]) for k in base)
