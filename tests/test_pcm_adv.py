"""PCM's optional adversarial consistency loss (pcm_lora, pcm; method.adv_*): off it changes nothing; on, each
side gets only its own gradient, the discriminator learns, a killed run resumes exactly, the export has no
discriminator; the heads read the teacher's block outputs (UNet and U-ViT); the math of re-noising."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.diffusion import lcm, pcm, tcd
from ldmkit.errors import UserError
from ldmkit.lora.adapters import adapters_disabled
from ldmkit.methods import load_config
from ldmkit.methods.base import StepCounter
from ldmkit.methods.pcm import PhasedTarget, discriminator_hinge, generator_hinge
from ldmkit.models import discriminator
from ldmkit.rng import SampleRNG
from ldmkit.train.checkpoint import load_extra

from helpers.lcm import fixed_batch, make_distill_method, train_steps, unet_inputs, unet_out
from helpers.runs import assert_same_exports, crash_after_step, logged
from helpers.uvit import pinned_threads, tiny_pipeline, tiny_uvit  # noqa: F401

ROOT = Path(__file__).parents[1]
RES = 32
ADV = ("--method.adv_weight=0.5",)


def make(name: str, model_dir, out_dir, *extra: str):
    return make_distill_method(
        name, model_dir, out_dir, "--method.loss_type=huber", "--method.num_ddim_timesteps=25", *extra, res=RES
    )


def random_lora(method, seed: int = 0) -> None:
    """LoRA up-projections (zero at init) made random, so the student differs from its teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in method.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]


# ------------------------------------------------------------------------------------------- off
def test_off_by_default_and_the_loss_is_algorithm_1_by_hand(tiny_sd15, tmp_path):
    """adv_weight 0 (the default): no discriminator anywhere, and the loss is the PCM-LoRA loss computed here
    from the primitives in the frame's order of draws (exactly: the adversarial code changes no number)."""
    m = make("pcm_lora", tiny_sd15, tmp_path)
    assert m.mcfg.adv_weight == 0 and m.disc is None and m.trainable_names == ("unet",)
    assert "adv_steps" not in m.checkpoint_objects() and len(m.clip_groups()) == 1
    assert [g["params"] for g in m.param_groups()] == [m.parameters()]
    random_lora(m)
    batch = fixed_batch()
    loss, logs = m.loss(batch)
    assert logs == {}

    unet, ac, fam = m.unet, m.alphas_cumprod, m.family
    rng = SampleRNG(batch["seed"])
    z = fam.latents(batch, rng)
    cond, uncond = fam.conditions(batch, resolution=RES)
    c, u = cond["prompt_embeds"].float(), uncond["prompt_embeds"].float()
    index = rng.randint(0, 25)
    t_start = m.ddim_timesteps[index]
    t = (t_start - 40).clamp(min=0)  # k = 1000 // 25
    a = ac[t_start].reshape(-1, 1, 1, 1)
    z_start = a.sqrt() * z + (1 - a).sqrt() * rng.randn(*z.shape[1:])
    w = m.w_min + (m.mcfg.w_max - m.w_min) * rng.rand()
    end = pcm.phase_end_timesteps(index, m.ddim_timesteps, 4)
    f = lambda out, x, at: tcd.trajectory_consistency_function(out, x, at, end, "epsilon", ac)  # noqa: E731
    student = f(unet(z_start, t_start, encoder_hidden_states=c).sample, z_start, t_start)
    with torch.no_grad():
        with adapters_disabled(unet):
            both = unet(torch.cat([z_start] * 2), torch.cat([t_start] * 2), encoder_hidden_states=torch.cat([c, u]))
        out_c, out_u = both.sample.chunk(2)
        wb = w.reshape(-1, 1, 1, 1)
        x0 = [lcm.predicted_origin(o, t_start, z_start, "epsilon", ac) for o in (out_c, out_u)]
        eps = [lcm.predicted_noise(o, t_start, z_start, "epsilon", ac) for o in (out_c, out_u)]
        x0_hat, eps_hat = x0[0] + wb * (x0[0] - x0[1]), eps[0] + wb * (eps[0] - eps[1])
        z_prev = lcm.ddim_step(x0_hat, eps_hat, lcm.ddim_alpha_prev(ac, m.ddim_timesteps)[index]).float()
        target = f(unet(z_prev, t, encoder_hidden_states=c).sample, z_prev, t)
    assert torch.equal(loss, lcm.pseudo_huber(student, target, 0.001))


# ------------------------------------------------------------------------------------------- on
@pytest.mark.parametrize("name", ["pcm_lora", "pcm"])
def test_each_side_gets_only_its_own_gradient(tiny_sd15, tmp_path, name):
    """One backward of the method's loss gives the student the gradient of consistency + adv_weight x g_loss
    and the heads that of d_loss, both recomputed here with plain calls, where g_loss WOULD reach the heads
    and the student path is live (so neither check is vacuous)."""
    m = make(name, tiny_sd15, tmp_path, *ADV)
    if name == "pcm_lora":
        random_lora(m)
    assert m.trainable_names == ("unet", "disc") and len(m._taps) == 5  # SD: full layout, 2 down + mid + 2 up
    student = m._student_parameters()
    heads = list(m.disc.parameters())
    batch = fixed_batch()
    loss, logs = m.loss(batch)
    loss.backward()
    got_student, got_heads = [p.grad.clone() for p in student], [p.grad.clone() for p in heads]

    roles = m.roles()
    pair = m.consistency_pair(batch, roles)
    consistency = m.consistency_distance(pair)
    assert consistency.item() == logs["consistency_loss"]
    rng, ac, end = pair.rng, m.alphas_cumprod, pair.end
    t_adv = pcm.adversarial_timesteps(end, 1000, 4, rng.rand())
    fake = pcm.noise_travel(pair.student.float(), rng.randn(4, 4, 4), end, t_adv, ac)
    real = pcm.noise_travel(pair.target.float(), rng.randn(4, 4, 4), end, t_adv, ac)
    fake_features = m._teacher_features(roles, fake, t_adv, pair.cond)
    with torch.no_grad():
        real_features = m._teacher_features(roles, real, t_adv, pair.cond)
    g_loss = generator_hinge(m.disc(fake_features))
    d_loss = discriminator_hinge(m.disc(real_features), m.disc([f.detach() for f in fake_features]))
    assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    assert logs["d_loss"] == pytest.approx(d_loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx((consistency + 0.5 * g_loss + d_loss).item(), rel=1e-5)

    for a, b in zip(got_student, grads(consistency + 0.5 * g_loss, student)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    for a, b in zip(got_heads, grads(d_loss, heads)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert any(g.abs().max() > 0 for g in grads(g_loss, heads))  # what the detached weights keep out
    assert any(g.abs().max() > 0 for g in grads(g_loss, student))  # the adversarial part reaches the student


def test_the_discriminator_learns_a_fixed_problem(tiny_sd15, tmp_path):
    """The student fixed, the same batch and seeds each step: real and fake inputs repeat, and the heads
    (Adam, the reference's betas) learn to tell them apart."""
    m = make("pcm_lora", tiny_sd15, tmp_path, *ADV)
    random_lora(m)
    opt = torch.optim.Adam(m.disc.parameters(), lr=1e-3, betas=(0.0, 0.999))
    batch, d_losses = fixed_batch(), []
    for _ in range(10):
        loss, logs = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_losses.append(logs["d_loss"])
    assert d_losses[-1] < 0.5 * d_losses[0], d_losses
    assert logs["logits_real"] > logs["logits_fake"]


def test_the_heads_are_their_own_optimizer_group(tiny_sd15, tmp_path):
    from ldmkit.train.optim import make_optimizer

    m = make("pcm_lora", tiny_sd15, tmp_path, *ADV, "--method.adv_lr=2e-5", "--train.learning_rate=1e-3")
    opt = make_optimizer(m.cfg, m.param_groups(), 1)
    student, heads = opt.param_groups
    assert (student["lr"], student["betas"]) == (1e-3, (0.9, 0.999))
    assert (heads["lr"], heads["betas"]) == (2e-5, (0.0, 0.999))
    assert [p for g in opt.param_groups for p in g["params"]] == m.parameters()
    assert [len(g) for g in m.clip_groups()] == [len(student["params"]), len(heads["params"])]
    m.cfg.train.scale_lr = True  # batch 1 x accumulation 1 x 2 processes
    assert [g["lr"] for g in make_optimizer(m.cfg, m.param_groups(), 2).param_groups] == [2e-3, 4e-5]


@pytest.mark.parametrize("name,arch", [("pcm_lora", "sd15"), ("pcm", "sdxl")])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, request, shapes_folder, monkeypatch, name, arch):
    """The debug recipe with the adversarial term from step 2 (adv_start 1), killed after step 3 and run again
    (resuming at the step-2 checkpoint): same losses, same export, same discriminator, same step counter."""
    from ldmkit.train.loop import train

    model = request.getfixturevalue(f"tiny_{arch}")
    recipe = f"{name}/{'debug' if arch == 'sd15' else 'debug_sdxl'}"

    def cfg(run: str):
        args = [f"--model.pretrained={model}", f"--data.path={shapes_folder}", f"--data.cache_dir={tmp_path / 'c'}"]
        args += ["--train.max_steps=4", "--train.checkpoint_every=2", "--train.validate_every=0", "--train.log_every=1"]
        args += ["--train.validation_prompts=[]", "--train.batch_size=2", f"--output_dir={tmp_path / run}"]
        return load_config(recipe, [*args, *ADV, "--method.adv_start=1", "--method.adv_lr=1e-3"])

    train(cfg("full"))
    with monkeypatch.context() as mp:
        crash_after_step(mp, PhasedTarget, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg("killed"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000002"]
    train(cfg("killed"))

    assert logged(full, "adv_active") == [0.0, 1.0, 1.0, 1.0]  # step 1 ran with 0 steps done
    for key in ("loss", "consistency_loss", "d_loss", "g_loss"):
        assert logged(killed, key) == pytest.approx(logged(full, key), rel=1e-5), key
    assert_same_exports(full / "export", killed / "export", model)
    ck = "checkpoints/step-0000004"
    da, db = (load_file(str(run / ck / "trainable_1.safetensors")) for run in (full, killed))
    assert da and da.keys() == db.keys() and all(k.startswith("heads.") for k in da)
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=0, atol=1e-6)
    counter = StepCounter()
    load_extra(killed / ck, {"adv_steps": counter})
    assert counter.step == 4


@pytest.mark.parametrize("name", ["pcm_lora", "pcm"])
def test_the_export_has_no_discriminator_and_loads_as_before(tiny_sd15, tmp_path, name):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    on = make(name, tiny_sd15, tmp_path / "on", *ADV)
    train_steps(on, fixed_batch(), 2, 1e-3 if name == "pcm_lora" else 3e-5)
    off = make(name, tiny_sd15, tmp_path / "off")
    on.export(tmp_path / "on" / "export")
    off.export(tmp_path / "off" / "export")
    files = sorted(p.relative_to(tmp_path / "off" / "export") for p in (tmp_path / "off" / "export").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "on" / "export") for p in (tmp_path / "on" / "export").rglob("*"))
    for f in (f for f in files if f.suffix == ".safetensors"):
        keys = load_file(str(tmp_path / "on" / "export" / f)).keys()
        assert keys == load_file(str(tmp_path / "off" / "export" / f)).keys()
        assert not any("heads" in k or "disc" in k for k in keys)
    if name == "pcm_lora":
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
        pipe.load_lora_weights(str(tmp_path / "on" / "export"))
        inputs = unet_inputs(on.unet)
        torch.testing.assert_close(unet_out(pipe.unet, inputs), unet_out(on.unet, inputs), rtol=1e-5, atol=1e-5)
    else:
        pipe = DiffusionPipeline.from_pretrained(tmp_path / "on" / "export")
        target = on.target_unet.state_dict()
        assert all(torch.equal(v, target[k]) for k, v in pipe.unet.state_dict().items())


# ------------------------------------------------------------------------------------------- the heads' inputs
def test_unet_taps_are_the_block_outputs_and_light_stops_after_the_mid_block(tiny_sd15):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    inputs = unet_inputs(unet)
    seen: dict[str, list] = {"up": [], "norm_out": []}
    unet.up_blocks[0].register_forward_hook(lambda mod, a, out: seen["up"].append(out))
    unet.conv_norm_out.register_forward_pre_hook(lambda mod, a: seen["norm_out"].append(a[0]))
    with torch.no_grad():
        unet(**inputs)  # the plain pass: the first up block's output and the last one's (conv_norm_out's input)
    up, last = seen["up"].pop(), seen["norm_out"].pop()
    light = discriminator.feature_taps(unet, "light")
    with torch.no_grad(), discriminator.tapped(light) as features:
        unet(**inputs)
    assert [c for _, c, _ in light] == [32, 64, 64] and [f.shape[1] for f in features] == [32, 64, 64]
    assert seen["up"] == [] and seen["norm_out"] == []  # the pass stopped at the mid block
    full = discriminator.feature_taps(unet, "full")
    with torch.no_grad(), discriminator.tapped(full) as features:
        unet(**inputs)
    assert [c for _, c, _ in full] == [32, 64, 64, 64, 32] and len(features) == 5
    assert torch.equal(features[3], up) and torch.equal(features[-1], last)
    assert seen["norm_out"] == []  # it stopped at the last up block
    assert [len(b._forward_hooks) for b, _, _ in full] == [0, 0, 0, 1, 0]  # only the test's own hook is left


def test_uvit_taps_are_the_patch_tokens_on_their_grid():
    model = tiny_uvit().eval()
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, model.extras - 1, 32)
    seen = []
    model.norm.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    with torch.no_grad():
        model(x, t, encoder_hidden_states=ctx)  # the plain pass: the last out block's tokens (norm's input)
    taps = discriminator.feature_taps(model, "full")
    with torch.no_grad(), discriminator.tapped(taps) as features:
        model(x, t, encoder_hidden_states=ctx)
    assert len(taps) == 3 and len(discriminator.feature_taps(model, "light")) == 2  # in, mid (, out)
    tokens, side = seen.pop(), 2  # 4x4 latents, patch 2
    assert seen == []  # the tapped pass stopped at the last out block
    assert features[-1].shape == (2, 32, side, side)
    for i in range(side):
        for j in range(side):
            assert torch.equal(features[-1][:, :, i, j], tokens[:, model.extras + i * side + j])


def test_uvit_teacher_trains_with_token_features(tiny_sd15, tmp_path):
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    tiny_pipeline(tiny_sd15, tiny_uvit()).save_pretrained(teacher)
    m = make("pcm_lora", teacher, tmp_path / "run", *ADV, "--method.w_min=1.5", "--method.w_max=2.5")
    assert len(m._taps) == 2  # light by default: in block + mid block
    loss, logs = m.loss(fixed_batch())
    loss.backward()
    assert torch.isfinite(loss) and logs["adv_active"] == 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.disc.parameters())
    assert all(head.conv_out.weight.grad.abs().max() > 0 for heads in m.disc.heads for head in heads)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m._student_parameters())


def test_head_layouts_are_the_references():
    full = discriminator.FeatureDiscriminator([320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320], "full")
    assert len(full.heads) == 9 and all(len(h) == 4 for h in full.heads)
    assert full.heads[0][0].conv1[0].kernel_size == (3, 3) and full.heads[0][0].conv1[1].num_groups == 32
    light = discriminator.FeatureDiscriminator([320, 640, 1280, 1280], "light")
    assert all(len(h) == 1 for h in light.heads) and light.heads[0][0].conv1[0].kernel_size == (1, 1)
    logits = light([torch.randn(2, c, 4, 4) for c in (320, 640, 1280, 1280)])
    assert [tuple(x.shape) for x in logits] == [(2, 1, 4, 4)] * 4


# ------------------------------------------------------------------------------------------- math and knobs
def test_noise_travel_keeps_the_marginal_and_is_the_identity_at_s():
    ac = torch.linspace(0.9991, 0.0047, 1000)
    x0 = torch.full((200_000, 1), 0.7)
    s, t = torch.full((200_000,), 259), torch.full((200_000,), 400)
    x_s = ac[259].sqrt() * x0 + (1 - ac[259]).sqrt() * torch.randn_like(x0)
    x_t = pcm.noise_travel(x_s, torch.randn_like(x0), s, t, ac)
    assert (x_t - ac[400].sqrt() * x0).var().item() == pytest.approx((1 - ac[400]).item(), rel=0.02)
    assert (x_t.mean() / x0.mean()).item() == pytest.approx(ac[400].sqrt().item(), rel=0.02)
    assert torch.equal(pcm.noise_travel(x_s, torch.randn_like(x0), s, s, ac), x_s)


def test_adversarial_timesteps_lie_in_the_phase_above_the_edge():
    end = torch.tensor([0, 259, 499, 759, 759])
    u = torch.tensor([0.0, 0.5, 0.999999, 0.999999, 0.0])
    assert pcm.adversarial_timesteps(end, 1000, 4, u).tolist() == [0, 259 + 125, 499 + 249, 999, 759]
    many = pcm.adversarial_timesteps(torch.full((4000,), 499), 1000, 4, torch.rand(4000))
    assert many.min() == 499 and many.max() == 748


@pytest.mark.parametrize(
    "override", ["--method.adv_weight=-0.1", "--method.adv_start=-1", "--method.adv_lr=0", "--method.adv_heads=huge"]
)
@pytest.mark.parametrize("recipe", ["pcm_lora", "pcm"])
def test_bad_adversarial_knobs_are_user_errors(recipe, override):
    with pytest.raises(UserError):
        load_config(str(ROOT / "configs" / recipe / "debug.yaml"), [override])
