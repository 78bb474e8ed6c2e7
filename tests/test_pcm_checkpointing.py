"""PCM's adversarial step under ``train.gradient_checkpointing`` (issue: CheckpointError with pcm_lora's
``plain_teacher`` off): the teacher-feature pass runs with the LoRA switched off, and the checkpointed blocks must
recompute in the backward with the adapter state (and tensors) of that pass, not the state at backward time."""

from __future__ import annotations

import pytest
import torch

from helpers.lcm import fixed_batch, make_distill_method
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)


def step(m) -> tuple[dict, list[torch.Tensor | None]]:
    """One loss and backward: (logs, every trainable gradient)."""
    for p in m.parameters():
        p.grad = None
    loss, logs = m.loss(fixed_batch())
    loss.backward()
    return logs, [None if p.grad is None else p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("plain_teacher", [False, True])
def test_pcm_adversarial_step_is_the_same_with_gradient_checkpointing(plain_teacher, tiny_sd15, tmp_path):
    """pcm_lora with the adversarial term on: the loss terms and every gradient (LoRA and discriminator heads)
    are the same with the UNet's blocks checkpointed as with them kept, the student's LoRA moved off zero so that
    a recomputation with the adapters on (where the teacher pass had them off) would change the numbers."""
    m = make_distill_method(
        "pcm_lora", tiny_sd15, tmp_path, "--method.adv_weight=0.5", f"--method.plain_teacher={plain_teacher}"
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    plain = step(m)
    m.enable_gradient_checkpointing()
    assert m.unet.is_gradient_checkpointing
    checkpointed = step(m)
    assert plain[0]["adv_active"] == 1.0 and plain[0]["g_loss"] > 0
    assert plain[0].keys() == checkpointed[0].keys()
    for k in plain[0]:
        assert checkpointed[0][k] == pytest.approx(plain[0][k], rel=1e-5, abs=1e-7), k
    assert any(x is not None and x.abs().sum() > 0 for x in plain[1])
    for x, y in zip(plain[1], checkpointed[1]):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x)
