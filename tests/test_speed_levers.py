"""train.channels_last and train.compile (train/loop.py apply_speed_levers) leave the LCD / LCM-LoRA loss unchanged."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

import pytest
import torch

from ldmkit.config import is_bookkeeping
from ldmkit.train.loop import apply_speed_levers

from helpers.lcm import fixed_batch
from helpers.lcm import make_distill_method as make_method


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


def test_levers_are_bookkeeping_for_resume():
    """A run resumed with a lever switched on or off computes the same numbers: no config-change stop."""
    assert is_bookkeeping("train.compile") and is_bookkeeping("train.channels_last")


def test_no_levers_is_a_no_op(tmp_path, tiny_sd15):
    method = make_method("lcm_lora", tiny_sd15, tmp_path)
    forward = method.unet.forward
    _levers(method)
    assert method.unet.forward == forward and method.unet._compiled_call_impl is None
    assert method.unet.conv_in.weight.is_contiguous()
