"""Method ``vae`` with LDM's adversarial and perceptual terms: hinge loss, adaptive weight, disc_start,
a local perceptual network, resume with the discriminator on, and two processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.errors import UserError
from ldmkit.methods import load_config
from ldmkit.rng import SampleRNG

from helpers.runs import crash_after_step, launch_two, logged
from helpers.threads import thread_env
from helpers.uvit import pinned_threads  # noqa: F401

ROOT = Path(__file__).parents[1]
DEBUG = ROOT / "configs" / "vae" / "debug.yaml"
GAN = ["--method.disc_weight=0.5", "--method.disc_channels=8", "--train.log_every=1"]


def debug_cfg(data: Path, out: Path, *extra: str):
    return load_config(str(DEBUG), [f"--data.path={data}", f"--output_dir={out}", *extra])


def make_method(cfg):
    from accelerate import Accelerator

    from ldmkit.methods.vae import VAEMethod

    torch.manual_seed(0)
    return VAEMethod(cfg, Accelerator(cpu=True))


def _batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 3, 32, 32)
    for i in range(n):
        top, left = torch.randint(0, 20, (2,), generator=g).tolist()
        x[i, :, top : top + 10, left : left + 10] = torch.rand(3, 1, 1, generator=g)
    return {"pixel_values": x * 2 - 1, "seed": torch.arange(n)}


def test_hinge_and_vanilla_losses_by_hand():
    from ldmkit.methods.vae import hinge_d_loss, vanilla_d_loss

    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6; half the sum = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    # confident and right: no loss at all
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -4.0])).item() == 0.0
    sp = torch.nn.functional.softplus
    want = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want.item())
    assert vanilla_d_loss(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(float(torch.log(torch.tensor(2.0))))


def test_adaptive_weight_formula():
    from ldmkit.methods.vae import adaptive_weight

    # norms 5 and 0.5: 5 / (0.5 + 1e-4)
    w = adaptive_weight(torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4]))
    assert w.item() == pytest.approx(5 / 0.5001)
    assert adaptive_weight(torch.ones(4), torch.zeros(4)).item() == 1e4  # clamped
    assert not adaptive_weight(torch.ones(2, requires_grad=True), torch.ones(2)).requires_grad


def test_the_method_weighs_the_generator_term_as_ldm(shapes_folder, tmp_path):
    """The logged adaptive weight, g_loss and d_loss equal a hand computation on the same forward pass, and
    the loss is rec + kl_weight kl + d_weight g + d_loss."""
    from ldmkit.methods.vae import hinge_d_loss

    m = make_method(debug_cfg(shapes_folder, tmp_path, *GAN))
    batch = _batch()
    loss, logs = m.loss(batch)
    assert logs["disc_active"] == 1.0 and m.trainable_names == ("net", "disc")

    x = batch["pixel_values"]
    rec, z, kl = m.net(x, SampleRNG(batch["seed"]).randn(4, 4, 4))
    rec_loss = (rec - x).abs().mean()
    g_loss = -m.disc.disc(rec).mean()
    last = m.vae.decoder.conv_out.weight
    gr = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = 0.5 * gr.norm() / (gg.norm() + 1e-4)
    d_loss = hinge_d_loss(m.disc.disc(x), m.disc.disc(rec))
    assert logs["d_weight"] == pytest.approx(d_weight.item(), rel=1e-4)
    assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    assert logs["d_loss"] == pytest.approx(d_loss.item(), rel=1e-5)
    kl_loss = kl.mean() / x[0].numel()
    want = rec_loss + 1e-6 * kl_loss + d_weight * g_loss + d_loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_each_module_gets_only_its_own_gradient(shapes_folder, tmp_path):
    """One backward serves both: the discriminator's gradient is that of its hinge loss alone (the
    generator term reaches it through detached weights), and the autoencoder's has no d_loss part."""
    from ldmkit.methods.vae import hinge_d_loss

    m = make_method(debug_cfg(shapes_folder, tmp_path, *GAN))
    batch = _batch()
    loss, _ = m.loss(batch)
    loss.backward()
    got = [p.grad.clone() for p in m.disc.parameters()]
    m.disc.zero_grad()
    x = batch["pixel_values"]
    with torch.no_grad():
        rec, _, _ = m.net(x, SampleRNG(batch["seed"]).randn(4, 4, 4))
    hinge_d_loss(m.disc.disc(x), m.disc.disc(rec)).backward()
    for a, p in zip(got, m.disc.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_clip_groups_split_the_autoencoder_from_the_discriminator(shapes_folder, tmp_path):
    """train.max_grad_norm clips each module by its own norm: the groups partition the optimizer's parameters."""
    m = make_method(debug_cfg(shapes_folder, tmp_path, *GAN))
    net, disc = m.clip_groups()
    assert {id(p) for p in net} == {id(p) for p in m.net.parameters()}
    assert {id(p) for p in disc} == {id(p) for p in m.disc.parameters()}
    assert len(net) + len(disc) == len(m.parameters())
    plain = make_method(debug_cfg(shapes_folder, tmp_path))
    assert plain.disc is None and len(plain.clip_groups()) == 1 and plain.trainable_names == ("net",)


def test_discriminator_switches_on_at_disc_start(shapes_folder, tmp_path):
    from ldmkit.train.loop import train

    out = tmp_path / "run"
    train(debug_cfg(shapes_folder, out, *GAN, "--method.disc_start=2", "--train.max_steps=4"))
    active = logged(out, "disc_active")
    assert active == [0.0, 0.0, 1.0, 1.0]  # steps 1-2 ran with 0 and 1 steps done; step 3 with 2
    d_loss, g_loss, d_weight = logged(out, "d_loss"), logged(out, "g_loss"), logged(out, "d_weight")
    assert d_loss[:2] == g_loss[:2] == d_weight[:2] == [0.0, 0.0]
    assert all(v > 0 for v in d_loss[2:] + d_weight[2:])
    rec = logged(out, "rec_loss")
    total = logged(out, "loss")
    assert total[0] == pytest.approx(rec[0] + 1e-6 * logged(out, "kl")[0], rel=1e-6)  # before: L1 + KL only
    assert total[2] != pytest.approx(rec[2] + 1e-6 * logged(out, "kl")[2], rel=1e-3)


def test_resume_equals_uninterrupted_with_the_gan_on(shapes_folder, tmp_path, monkeypatch):
    from ldmkit.methods.vae import VAEMethod
    from ldmkit.train.loop import train

    args = [*GAN, "--method.disc_start=1", "--train.max_steps=6", "--train.checkpoint_every=3"]
    train(debug_cfg(shapes_folder, tmp_path / "full", *args))
    with monkeypatch.context() as mp:
        crash_after_step(mp, VAEMethod, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(debug_cfg(shapes_folder, tmp_path / "killed", *args))
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000003"]
    train(debug_cfg(shapes_folder, killed, *args))

    la, lb = logged(tmp_path / "full"), logged(killed)
    assert len(lb) == 6 and la == pytest.approx(lb, rel=1e-5)
    assert logged(tmp_path / "full", "d_weight") == pytest.approx(logged(killed, "d_weight"), rel=1e-5)
    a = load_file(str(tmp_path / "full" / "export" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "export" / "diffusion_pytorch_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # the discriminator (second trainable module) and the step counter travel through the checkpoint
    ck = "checkpoints/step-0000006"
    da, db = (load_file(str(run / ck / "trainable_1.safetensors")) for run in (tmp_path / "full", killed))
    assert da and da.keys() == db.keys() and any(k.startswith("disc.") for k in da)
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=0, atol=1e-6)
    assert '"gan_steps"' in (killed / ck / "extra.json").read_text()


class _Distance(torch.nn.Module):
    """A stand-in perceptual network: squared distance of fixed 1x1-conv features, one value per sample."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 5, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 15).reshape(5, 3, 1, 1))
            self.proj.bias.fill_(0.1)

    def forward(self, x, y):
        return (self.proj(x) - self.proj(y)).square().mean(dim=(1, 2, 3))


def test_perceptual_term_from_a_local_torchscript_file(shapes_folder, tmp_path):
    path = tmp_path / "lpips.pt"
    torch.jit.script(_Distance()).save(str(path))
    cfg = debug_cfg(shapes_folder, tmp_path, f"--method.lpips_weights={path}", "--method.perceptual_weight=2.0")
    m = make_method(cfg)
    batch = _batch()
    loss, logs = m.loss(batch)

    x = batch["pixel_values"]
    rec, _, kl = m.net(x, SampleRNG(batch["seed"]).randn(4, 4, 4))
    w = torch.linspace(-1, 1, 15).reshape(5, 3)  # the stand-in's distance, by hand (the bias cancels)
    diff = torch.einsum("oc,bchw->bohw", w, x - rec)
    p_loss = diff.square().mean()
    assert logs["p_loss"] == pytest.approx(p_loss.item(), rel=1e-5)
    want = (rec - x).abs().mean() + 2.0 * p_loss + 1e-6 * kl.mean() / x[0].numel()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()  # gradients reach the autoencoder through the frozen network
    assert m.vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in m.perceptual.parameters())


def test_perceptual_settings_are_resolved_and_checked(shapes_folder, tmp_path):
    # no weights: the term is off, and the resolved config says so
    assert debug_cfg(shapes_folder, tmp_path).method.perceptual_weight == 0.0
    path = tmp_path / "lpips.pt"
    torch.jit.script(_Distance()).save(str(path))
    assert debug_cfg(shapes_folder, tmp_path, f"--method.lpips_weights={path}").method.perceptual_weight == 1.0
    with pytest.raises(UserError, match=r"method.lpips_weights: no such file: .*missing.pt") as e:
        debug_cfg(shapes_folder, tmp_path, f"--method.lpips_weights={tmp_path / 'missing.pt'}")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs method.lpips_weights"):
        debug_cfg(shapes_folder, tmp_path, "--method.perceptual_weight=1.0")
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(2)}, bad)  # a state dict, not a TorchScript module
    with pytest.raises(UserError, match="not a TorchScript module"):
        make_method(debug_cfg(shapes_folder, tmp_path, f"--method.lpips_weights={bad}"))
    with pytest.raises(UserError, match="too small for method.disc_layers=4"):
        debug_cfg(shapes_folder, tmp_path, *GAN, "--method.disc_layers=4")
    with pytest.raises(UserError, match="method.disc_start must be >= 0"):
        debug_cfg(shapes_folder, tmp_path, *GAN, "--method.disc_start=-1")


def test_discriminator_shapes_and_init():
    from ldmkit.models.discriminator import PatchDiscriminator

    for norm in ("batch", "group"):
        d = PatchDiscriminator(3, 8, 3, norm)
        assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 / 2^3 - 2
        assert d(torch.zeros(1, 3, 24, 24)).shape == (1, 1, 1, 1)  # the smallest input
        assert not list(d.buffers())  # nothing but weights to checkpoint
    convs = [mod for mod in PatchDiscriminator(3, 64, 3).modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert convs[3].weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.slow
def test_two_processes_reproduce_one_with_the_gan_on(shapes_folder, tmp_path):
    """Group-normalised discriminator, adaptive weight from the mean gradients over processes: two
    processes x batch 2 train what one process x batch 4 trains."""
    env = thread_env(HF_HUB_OFFLINE="1")
    common = [
        "-m",
        "ldmkit",
        "train",
        str(DEBUG),
        f"--data.path={shapes_folder}",
        *GAN,
        "--method.disc_norm=group",
        "--method.disc_start=1",
        "--train.max_steps=4",
        "--train.checkpoint_every=0",
        "--train.validate_every=0",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run(
        [sys.executable, *common, "--train.batch_size=4", f"--output_dir={one}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [*launch_two(), *common, "--train.batch_size=2", f"--output_dir={two}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged(two, "disc_active") == [0.0, 1.0, 1.0, 1.0]
    # loss is gathered over processes and d_weight reduced; the other terms are logged for rank 0's half
    for key in ("loss", "d_weight"):
        assert logged(two, key) == pytest.approx(logged(one, key), rel=1e-4), key
    a = load_file(str(one / "export" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(two / "export" / "diffusion_pytorch_model.safetensors"))
    # The losses above depend on every earlier step's weights; the weights themselves agree overall to 1e-4
    # (measured). Per tensor they need not: a bias in front of a GroupNorm (or an attention key bias) has a
    # zero gradient up to float noise, and Adam turns any noise into steps of ~lr.
    diff = sum((a[k] - b[k]).square().sum() for k in a) / sum(a[k].square().sum() for k in a)
    assert diff.sqrt() < 1e-3
