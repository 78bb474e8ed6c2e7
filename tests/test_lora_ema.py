"""LCM-LoRA's optional averages of the LoRA weights (methods/lcd.py): an EMA target (method.target_ema_decay,
full LCD's constant-decay target restricted to the LoRA) and an exported Polyak average
(method.export_ema_decay). Off, the method is the reference's; on, they follow the EMA formulas."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file

from helpers.lcm import fixed_batch, make_distill_method, train_steps


def _lora(method) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method._lora_params()]


def test_target_ema_follows_the_constant_decay_formula(tiny_sd15, tmp_path):
    """After each step the target's LoRA = d * previous + (1 - d) * the student's new LoRA; the first loss
    equals the reference's (the average starts at the initial weights), later ones differ."""
    batch = fixed_batch()
    plain = make_distill_method("lcm_lora", tiny_sd15, tmp_path / "a")
    ema = make_distill_method("lcm_lora", tiny_sd15, tmp_path / "b", "--method.target_ema_decay=0.9")
    # Step 0: the average is the initial LoRA, so loss and gradients are the reference's (same initial LoRA).
    with torch.no_grad():
        for a, b, shadow in zip(plain._lora_params(), ema._lora_params(), ema.target_ema.shadow_params):
            b.copy_(a)
            shadow.copy_(a)
    for method in (plain, ema):
        method.loss(batch)[0].backward()
    assert torch.equal(plain.loss(batch)[0], ema.loss(batch)[0])
    for a, b in zip(plain._lora_params(), ema._lora_params()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)
        a.grad = b.grad = None
    expected = _lora(ema)
    opt = torch.optim.AdamW(ema.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(1, 4):
        loss, _ = ema.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.after_step(step)
        expected = [0.9 * e + 0.1 * p for e, p in zip(expected, _lora(ema))]
        for e, s in zip(expected, ema.target_ema.shadow_params):
            torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-7)
    # The student's own weights stay online and differ from the average.
    assert not all(torch.equal(a, b) for a, b in zip(_lora(ema), ema.target_ema.shadow_params))


def test_exported_lora_is_the_average(tiny_sd15, tmp_path):
    """export_ema_decay: the exported LoRA holds the EMA's weights, the method keeps training the last ones."""
    method = make_distill_method("lcm_lora", tiny_sd15, tmp_path / "run", "--method.export_ema_decay=0.5")
    train_steps(method, fixed_batch(), 4, lr=1e-2)
    last = _lora(method)
    average = [s.clone() for s in method.export_ema.shadow_params]
    assert any(not torch.equal(a, b) for a, b in zip(last, average))
    method.export(tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(last, _lora(method)))  # swapped back
    exported = load_file(tmp_path / "export" / "pytorch_lora_weights.safetensors")
    # Export of the average: the same tensors an export with the average copied in writes.
    copied = copy.deepcopy(method)
    for p, s in zip(copied._lora_params(), average):
        p.data.copy_(s)
    copied.export_ema = None
    copied.export(tmp_path / "export-copied")
    again = load_file(tmp_path / "export-copied" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == again.keys()
    assert all(torch.equal(exported[k], again[k]) for k in exported)


def test_resume_with_both_averages_equals_uninterrupted(tiny_sd15, shapes_folder, tmp_path):
    """Both averages are checkpointed: a restart gives the same export (the export EMA's weights) and losses."""
    from helpers.runs import assert_debug_recipe_resumes

    extra = ("--method.target_ema_decay=0.9", "--method.export_ema_decay=0.5")
    assert_debug_recipe_resumes("lcm_lora", "sd15", tiny_sd15, shapes_folder, tmp_path, extra)
