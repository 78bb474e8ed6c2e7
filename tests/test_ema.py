"""ldmkit.methods.ema.EMA: bit-identical to diffusers' EMAModel for its schedules, the LCD target's lerp for the
constant one, checkpoints that load onto the model's device, and a finetune run with EMA that resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from ldmkit.errors import UserError
from ldmkit.methods.ema import EMA
from ldmkit.train import checkpoint as ckpt

from helpers.runs import assert_same_exports, logged
from helpers.sd import accelerator, make_cfg, pinned_threads  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def net(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)).to(device)
    model[1].weight.requires_grad_(False)  # a frozen parameter: diffusers copies it instead of averaging
    return model


@torch.no_grad()
def perturb(model: nn.Module, g: torch.Generator) -> None:
    """A random 'optimizer step' (of varying size, so the average is not trivially the weights)."""
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * torch.rand((), generator=g))


@pytest.mark.parametrize(
    "schedule, kwargs",
    [
        ("ramp", {}),
        ("warmup", {"use_ema_warmup": True, "power": 2 / 3}),
        ("warmup", {"use_ema_warmup": True, "power": 3 / 4}),
    ],
)
@pytest.mark.parametrize("decay", [0.8, 0.9999])
def test_diffusers_schedules_are_bit_identical_to_emamodel(schedule, kwargs, decay):
    model = net()
    ours = EMA(model.parameters(), decay=decay, schedule=schedule, power=kwargs.get("power", 2 / 3))
    theirs = EMAModel(model.parameters(), decay=decay, **kwargs)
    g = torch.Generator().manual_seed(1)
    capped = False
    for step in range(1, 41):
        perturb(model, g)
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert ours.decay_at(step) == theirs.cur_decay_value
        capped |= ours.decay_at(step) == decay
        assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params)), step
    assert ours.decay_at(1) == 0.0 and 0.0 < ours.decay_at(2) < ours.decay_at(40)
    assert capped == (decay == 0.8)  # the cap was reached (0.8) or the schedule still ramps (0.9999)
    assert not torch.equal(ours.shadow_params[0], model[0].weight)  # an average, not a copy
    assert torch.equal(ours.shadow_params[2], model[1].weight)  # the frozen one is copied


def test_constant_schedule_is_the_lcd_targets_lerp_on_the_module_itself():
    """The LCD target: the shadow is the module's own parameters, decay from the first update, updated by
    today's ``torch._foreach_lerp_`` (bit-equal) = the LCM references' ``mul_(rate).add_(src, alpha=1 - rate)``
    within float32 rounding (lerp fuses a multiply-add)."""
    student, target = net(), net()
    with torch.no_grad():
        for p in target.parameters():
            p.mul_(0.5)
    ema = EMA(target, decay=0.95, schedule="constant")
    assert all(s is p for s, p in zip(ema.shadow_params, target.parameters()))
    lerped = [p.detach().clone() for p in target.parameters()]
    reference = [p.detach().clone() for p in target.parameters()]
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        perturb(student, g)
        ema.step(student.parameters())
        online = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(lerped, online, 1.0 - 0.95)
        for t, s in zip(reference, online):
            t.mul_(0.95).add_(s, alpha=1 - 0.95)
    assert ema.decay_at(1) == 0.95
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), lerped))
    for p, q in zip(target.parameters(), reference):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(target[0].weight, student[0].weight)


def test_swapped_into_puts_the_average_in_and_takes_it_out():
    model = net()
    ema = EMA(model.parameters(), decay=0.5)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        perturb(model, g)
        ema.step(model.parameters())
    online = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_into(model.parameters()):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
        assert not torch.equal(model[0].weight, online[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), online))


def test_checkpoint_loads_onto_the_models_device_and_old_files_still_load(tmp_path):
    """A checkpoint read on CPU (as ckpt.load_extra does) into an EMA of a model on another device: the
    shadow stays with the model and the next step runs. The file of diffusers' EMAModel (the format of
    checkpoints before this class) loads too."""
    cpu = net()
    saved = EMA(cpu.parameters(), decay=0.9, schedule="warmup")
    diffusers_ema = EMAModel(cpu.parameters(), decay=0.9, use_ema_warmup=True)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        perturb(cpu, g)
        saved.step(cpu.parameters())
        diffusers_ema.step(cpu.parameters())
    ckpt.save_extra(tmp_path, {"ema": saved, "old": diffusers_ema})

    meta = net("meta")
    on_meta = EMA(meta.parameters(), decay=0.9, schedule="warmup")
    ckpt.load_extra(tmp_path, {"ema": on_meta})
    assert on_meta.optimization_step == 5
    assert all(s.device.type == "meta" for s in on_meta.shadow_params)
    on_meta.step(meta.parameters())
    assert all(s.device.type == "meta" for s in on_meta.shadow_params) and on_meta.optimization_step == 6

    fresh = EMA(net().parameters(), decay=0.9, schedule="warmup")
    ckpt.load_extra(tmp_path, {"old": fresh})
    assert fresh.optimization_step == 5
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, diffusers_ema.shadow_params))
    fresh.step(cpu.parameters())
    diffusers_ema.step(cpu.parameters())
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, diffusers_ema.shadow_params))

    with pytest.raises(UserError, match="tensors"):
        EMA(nn.Linear(2, 2).parameters(), decay=0.9).load_state_dict(saved.state_dict())


def test_lcd_target_loads_old_module_checkpoints():
    """Before this class the LCD target was checkpointed as a module state dict (key target_unet)."""
    old, target = net(), net()
    with torch.no_grad():
        old[0].weight.add_(1.0)
    ema = EMA(target, decay=0.95, schedule="constant")
    ema.load_state_dict(old.state_dict())
    assert torch.equal(target[0].weight, old[0].weight)


def test_finetune_ema_resumes_on_another_device(tiny_sd15, tmp_path):
    """FinetuneMethod(use_ema): the EMA checkpoint (CPU tensors) loaded while the UNet lives on another
    device (meta here, CUDA in practice) lands on the UNet's device, and the next after_step runs."""
    from ldmkit.methods.finetune import FinetuneConfig, FinetuneMethod

    method = FinetuneMethod(make_cfg(tiny_sd15, FinetuneConfig(use_ema=True, ema_decay=0.9)), accelerator())
    method.after_step(1)
    ckpt.save_extra(tmp_path, method.checkpoint_objects())
    method.unet.to("meta")
    method._make_trainable()  # the EMA of a UNet on the meta device, as at the start of a resumed run
    ckpt.load_extra(tmp_path, method.checkpoint_objects())
    assert all(s.device.type == "meta" for s in method.ema.shadow_params)
    method.after_step(2)
    assert method.ema.optimization_step == 2


def test_bad_decay_is_a_user_error():
    with pytest.raises(UserError, match="decay"):
        EMA(net().parameters(), decay=1.5)


@pytest.mark.slow
def test_finetune_with_ema_resume_equals_uninterrupted(tmp_path, tiny_sd15, shapes_folder):
    """The finetune debug recipe with use_ema through the training loop: stopped at step 2 and resumed, its
    exported (EMA) UNet and its losses equal an uninterrupted run's."""
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    def cfg(run: str, steps: int):
        return load_config(
            str(ROOT / "configs" / "finetune" / "debug.yaml"),
            [
                "--method.use_ema=true",
                "--method.ema_decay=0.9",
                f"--model.pretrained={tiny_sd15}",
                f"--data.path={shapes_folder}",
                f"--train.max_steps={steps}",
                "--train.checkpoint_every=2",
                "--train.validate_every=0",
                "--train.validation_prompts=[]",
                f"--output_dir={tmp_path / run}",
            ],
        )

    train(cfg("full", 4))
    train(cfg("resumed", 2))
    train(cfg("resumed", 4))
    assert_same_exports(tmp_path / "full" / "export", tmp_path / "resumed" / "export", tiny_sd15)
    la, lb = logged(tmp_path / "full"), logged(tmp_path / "resumed")
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)
