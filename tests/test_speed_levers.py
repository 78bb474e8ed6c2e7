"""train.channels_last, train.compile (train/loop.py apply_speed_levers) and the LoRA methods' plain teacher
(method.plain_teacher) leave the LCD / LCM-LoRA loss unchanged."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldmkit.config import is_bookkeeping
from ldmkit.train.loop import apply_speed_levers

from helpers.lcm import fixed_batch, shares_base_tensors
from helpers.lcm import make_distill_method as make_method
from helpers.toy_method import ToyMethod


def _levers(method, **train):
    cfg = replace(method.cfg, train=replace(method.cfg.train, **train))
    apply_speed_levers(cfg, method)


@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_channels_last_gives_the_same_loss_and_gradients(tmp_path, tiny_sd15, name):
    method = make_method(name, tiny_sd15, tmp_path)
    batch = fixed_batch(3)
    names = list(method.unet.state_dict())

    def loss_and_grads():
        loss = method.loss(batch)[0]
        loss.backward()
        grads = [p.grad.clone() for p in method.parameters()]
        method.unet.zero_grad(set_to_none=True)
        return loss.detach(), grads

    plain, plain_grads = loss_and_grads()
    _levers(method, channels_last=True)
    networks = [method.unet] + ([method.teacher_unet, method.target_unet] if name == "lcd" else [])
    for net in networks:  # every network the method holds was converted
        assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(method.unet.state_dict()) == names  # checkpoints and exports see the same names
    lever, lever_grads = loss_and_grads()
    # Float tolerance: channels-last only reorders the convolutions' summation.
    torch.testing.assert_close(lever, plain, rtol=1e-5, atol=1e-7)
    # Gradients, all parameters as one vector (some tensors' gradients are rounding noise, ~1e-8 here):
    # the difference is under 1e-4 of the gradient's norm.
    a, b = torch.cat([g.flatten() for g in lever_grads]), torch.cat([g.flatten() for g in plain_grads])
    assert (a - b).norm() <= 1e-4 * b.norm()


class _ToyNet(torch.nn.Module):
    """The toy's two convolutions under a forward written here. Dynamo lists torch/nn in its skip files, so
    ``Module.compile`` on a bare ``nn.Sequential`` compiles nothing (torch 2.13: every frame is skipped); a
    forward in user code is traced, with the torch.nn layers inside it, as a diffusers UNet's is."""

    def __init__(self, width: int):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, width, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(torch.nn.functional.silu(self.conv_in(x)))  # (B, 3, H, W)


class CompilableToy(ToyMethod):
    """The toy method with ``_ToyNet``: what train.compile acts on, small enough to compile in seconds."""

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        torch.manual_seed(0)
        self.net = _ToyNet(self.mcfg.width)


def _toy_run(out: Path, data: Path, *extra: str) -> Path:
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    cfg = load_config(
        None,
        [
            "--method.name=compilable_toy",
            "--method.width=4",
            f"--data.path={data}",
            "--data.resolution=8",
            "--data.num_workers=0",
            "--train.batch_size=2",
            "--train.max_steps=2",
            "--train.learning_rate=1e-2",
            "--train.checkpoint_every=0",
            "--train.report_to=none",
            f"--output_dir={out}",
            *extra,
        ],
    )
    return train(cfg)


def test_compile_trains_the_same_in_seconds(tmp_path, shapes_folder, monkeypatch):
    """The small form of the compile check, which CI runs (seconds; the UNet form below takes minutes):
    ``train.compile=true`` through the training loop on a toy denoiser (two 3x3 convolutions, 8 px) for 2
    optimizer steps compiles its graph and gives the losses at both steps and the exported weights of the
    uncompiled run, up to the float reordering of inductor's fused kernels."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler")
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    from helpers.runs import logged

    plugins = os.environ.get("LDMKIT_METHODS", "")
    monkeypatch.setenv("LDMKIT_METHODS", f"{plugins},compilable_toy={__name__}:CompilableToy")
    torch._dynamo.reset()
    counters.clear()
    plain_export = _toy_run(tmp_path / "plain", shapes_folder)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_export = _toy_run(tmp_path / "compiled", shapes_folder, "--train.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled (not a silent no-op)
    plain, compiled = logged(tmp_path / "plain"), logged(tmp_path / "compiled")
    assert len(plain) == len(compiled) == 2 and plain[0] != plain[1]  # step 2 saw step 1's update
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-6)
    a, b = (load_file(str(e / "toy.safetensors")) for e in (plain_export, compiled_export))
    assert a.keys() == b.keys()  # compiling in place leaves parameter names (checkpoints, exports) alone
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_compile_gives_the_same_loss(tmp_path, tiny_sd15):
    """torch.compile (inductor) fuses and reorders float ops: the same loss within rtol 1e-4 (looser than the
    other levers). Compiling the tiny UNet's forward, backward and adapter-disabled teacher pass took 9 minutes
    on a busy 2-core CPU, so this runs only with LDMKIT_TEST_COMPILE=1 (and still skips past 60 s)."""
    if os.environ.get("LDMKIT_TEST_COMPILE") != "1":
        pytest.skip("torch.compile takes minutes on a CPU; set LDMKIT_TEST_COMPILE=1 to run it")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C compiler")
    method = make_method("lcm_lora", tiny_sd15, tmp_path)
    batch = fixed_batch(2)
    with torch.no_grad():
        plain = method.loss(batch)[0]
    _levers(method, compile=True)
    start = time.perf_counter()
    loss = method.loss(batch)[0]  # the student (grad) and the teacher (adapters disabled, no grad) both compile
    loss.backward()
    if time.perf_counter() - start > 60:
        pytest.skip("compiling took more than 60 s on this machine")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())
    torch.testing.assert_close(loss.detach(), plain, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # compiled again (no recompilation per step): the same value
        torch.testing.assert_close(method.loss(batch)[0], loss.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lcm_lora", "pcm_lora"])
def test_plain_teacher_shares_the_weights_and_gives_the_same_loss(tmp_path, tiny_sd15, name):
    """The plain teacher is the base denoiser without adapter wrappers: the same tensors (no weight memory), no
    LoRA layer, and bit-for-bit the loss and gradients of the adapted denoiser with its adapters disabled (PCM-LoRA
    also taps it as its discriminator)."""
    batch = fixed_batch(3)
    results = {}
    for plain in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        method = make_method(name, tiny_sd15, tmp_path / str(plain), f"--method.plain_teacher={str(plain).lower()}")
        if plain:
            teacher = method.teacher_unet
            assert not any("lora" in n for n, _ in teacher.named_modules())
            assert shares_base_tensors(teacher, method.unet)  # the same tensors
            assert not any(p.requires_grad for p in teacher.parameters())
        else:
            assert method.teacher_unet is None
        loss = method.loss(batch)[0]
        loss.backward()
        results[plain] = (loss.detach(), [p.grad.clone() for p in method.parameters()])
    (a, ga), (b, gb) = results[False], results[True]
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_levers_are_bookkeeping_for_resume():
    """A run resumed with a lever switched on or off computes the same numbers: no config-change stop."""
    assert is_bookkeeping("train.compile") and is_bookkeeping("train.channels_last")
    assert is_bookkeeping("method.plain_teacher")


def test_no_levers_is_a_no_op(tmp_path, tiny_sd15):
    method = make_method("lcm_lora", tiny_sd15, tmp_path)
    forward = method.unet.forward
    _levers(method)
    assert method.unet.forward == forward and method.unet._compiled_call_impl is None
    assert method.unet.conv_in.weight.is_contiguous()
