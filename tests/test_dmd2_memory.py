"""DMD2's memory levers change no number (issue 24): gradient checkpointing with the GAN term on (the fake score
and the GAN's generator side call the denoiser with other weights through ``torch.func.functional_call``; the
recomputation must use them too), and peft's input cast switched off under bf16 autocast (every LoRA method's
training step)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from ldmkit.lora.adapters import input_casts_off_under_autocast

from helpers.lcm import fixed_batch
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision an Accelerator cannot change; these tests
    build fp32 and bf16 ones (reset as accelerate's own AccelerateTestCase does), and leave a fresh state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def build(name: str, model, out, *extra: str, precision: str = "no"):
    """A method as the loop builds it (``mixed_precision`` in the config and the accelerator), LoRA rank 4."""
    from accelerate import Accelerator

    from ldmkit.methods import get_method, load_config

    small = ["--method.lora_rank=4", "--method.lora_alpha=4"] if name.endswith("lora") else []
    cfg = load_config(
        None,
        [
            f"--method.name={name}",
            f"--model.pretrained={model}",
            "--data.resolution=32",
            "--train.report_to=none",
            f"--train.mixed_precision={precision}",
            f"--output_dir={out}",
            *small,
            *extra,
        ],
    )
    return get_method(name)(cfg, Accelerator(cpu=True, mixed_precision=precision))


def fake_score_apart(m) -> None:
    """Move the fake score away from the generator (both start as the teacher, so a recomputation that read
    the generator's weights in place of the fake score's would go unnoticed at initialisation)."""
    g = torch.Generator().manual_seed(1)
    weights = m.fake.weights if m.is_lora else m.fake.parameters()
    with torch.no_grad():
        for p in weights:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def step(m, turn: str, casts_off: bool = False) -> tuple[dict, list[torch.Tensor | None]]:
    """One loss and backward of ``m`` on a generator or fake-score turn: (logs, every trainable gradient)."""
    m.after_step(0 if turn == "generator" else 1)
    for p in m.parameters():
        p.grad = None
    models = [getattr(m, n) for n in m.trainable_names]
    with input_casts_off_under_autocast(models, m.accelerator.mixed_precision if casts_off else "no"):
        loss, logs = m.loss(fixed_batch())
        loss.backward()
    return logs, [None if p.grad is None else p.grad.clone() for p in m.parameters()]


def assert_same(a, b, exact: bool = False) -> None:
    """The same logs (losses) and gradients: to float tolerance, or ``exact``ly."""
    (logs_a, grads_a), (logs_b, grads_b) = a, b
    assert logs_a.keys() == logs_b.keys()
    for k in logs_a:
        assert logs_b[k] == (logs_a[k] if exact else pytest.approx(logs_a[k], rel=1e-5, abs=1e-7)), k
    assert [g is None for g in grads_a] == [g is None for g in grads_b]
    for x, y in zip(grads_a, grads_b):
        if x is not None:
            assert torch.equal(y, x) if exact else torch.testing.assert_close(y, x) is None


def saved_bytes(fn, *args):
    """(``fn(*args)``, bytes of the distinct tensors autograd saves for the backward outside checkpointed blocks
    while ``fn`` runs: a checkpointed block saves its inputs only)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


@pytest.fixture(scope="module")
def tiny_uvit_teacher(tiny_sd15, tmp_path_factory):
    """A tiny UViTPipeline folder (what a ``uvit`` run exports)."""
    from helpers.uvit import tiny_pipeline, tiny_uvit

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("uvit-teacher")
    tiny_pipeline(tiny_sd15, tiny_uvit()).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("sd15", "dmd2_lora"),
        ("sd15", "dmd2"),
        ("uvit_teacher", "dmd2_lora"),
        ("sd3", "dmd2_lora"),
        ("flux", "dmd2_lora"),
    ],
)
def test_gradient_checkpointing_with_the_gan_term_changes_no_loss_or_gradient(arch, name, request, tmp_path):
    """Both turns, GAN term on (generator side: detached fake-score weights; classifier side; the pass stopped
    at the tap): checkpointed as ``train.gradient_checkpointing`` sets it, the same losses and gradients."""
    m = build(name, request.getfixturevalue(f"tiny_{arch}"), tmp_path)
    assert m.classifier is not None
    fake_score_apart(m)
    for turn in ("generator", "fake_score"):
        plain, held = saved_bytes(step, m, turn)
        m.enable_gradient_checkpointing()
        checkpointed, held_checkpointed = saved_bytes(step, m, turn)
        for model in m._denoisers():
            model.disable_gradient_checkpointing()
        assert held_checkpointed < held  # the blocks were checkpointed
        assert any(g is not None and g.abs().sum() > 0 for g in plain[1])
        assert ("gen_cls_loss" in plain[0]) == (turn == "generator")
        assert_same(plain, checkpointed)


@pytest.mark.parametrize("name", ["lcm_lora", "dmd2_lora"])
def test_peft_input_cast_off_under_bf16_autocast_changes_no_number_and_saves_memory(name, tiny_sd15, tmp_path):
    """Under bf16 autocast, a LoRA method's step with peft's input cast off (as the loop takes it) has the
    same loss and LoRA gradients, bit for bit, and saves fewer bytes for its backward."""
    m = build(name, tiny_sd15, tmp_path, precision="bf16")
    if name == "dmd2_lora":
        fake_score_apart(m)
    assert_same(step(m, "generator"), step(m, "generator", casts_off=True), exact=True)
    _, on = saved_bytes(step, m, "generator")
    _, off = saved_bytes(step, m, "generator", True)
    assert off < on, (off, on)


def test_bf16_checkpointed_dmd2_lora_with_casts_off_equals_the_plain_step(tiny_sd15, tmp_path):
    """The loop's bf16 step with both levers (the recomputation runs inside the cast-off block too)."""
    m = build("dmd2_lora", tiny_sd15, tmp_path, precision="bf16")
    fake_score_apart(m)
    plain = step(m, "generator")
    m.enable_gradient_checkpointing()
    assert_same(plain, step(m, "generator", casts_off=True))


def test_input_cast_stays_where_it_would_change_numbers():
    """fp32 training (no autocast) and a LoRA whose dropout acts on its input keep peft's cast."""
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    dropped = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["0"], lora_dropout=0.1), torch.nn.Sequential(torch.nn.Linear(4, 4))
    )
    with input_casts_off_under_autocast([net, dropped], "bf16"):
        assert net[0].cast_input_dtype_enabled is False and dropped[0].cast_input_dtype_enabled is True
    assert net[0].cast_input_dtype_enabled is True
    with input_casts_off_under_autocast([net], "no"):
        assert net[0].cast_input_dtype_enabled is True
