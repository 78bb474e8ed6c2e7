"""U-ViT model: sizes of the paper, shapes, long skips, time token, guidance conditioning, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.models.uvit import UVIT_PRESETS, UViT, unpatchify

from helpers.uvit import TEXT_TOKENS, TEXT_WIDTH, pinned_threads, tiny_uvit  # noqa: F401


def _inputs(model: UViT, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(batch, c.num_text_tokens, c.context_dim, generator=g)
    return x, torch.tensor([3, 999])[:batch], ctx


def _count(name: str) -> float:
    with torch.device("meta"):
        model = UViT.from_preset(name, sample_size=32, in_channels=4, context_dim=768, num_text_tokens=77)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize(
    "name,low,high", [("uvit-s", 44, 46), ("uvit-s-deep", 57, 59), ("uvit-l", 280, 295), ("uvit-h", 490, 510)]
)
def test_parameter_counts_match_the_paper(name, low, high):
    # U-ViT paper, Table 1 (MS-COCO / ImageNet 256 latents): S 44M, S-deep 58M, L 287M, H 501M.
    assert low <= _count(name) <= high


def test_presets_have_the_paper_shapes():
    assert UVIT_PRESETS["uvit-s"] == dict(embed_dim=512, depth=12, num_heads=8)
    assert UVIT_PRESETS["uvit-l"] == dict(embed_dim=1024, depth=20, num_heads=16)
    m = tiny_uvit(depth=4)
    assert len(m.in_blocks) == len(m.out_blocks) == 2 and all(b.skip_linear is not None for b in m.out_blocks)
    assert m.pos_embed.shape == (1, 1 + TEXT_TOKENS + 4, m.config.embed_dim)
    assert m.in_blocks[0].attn.qkv.bias is None


@pytest.mark.parametrize("timestep", [5, 7.5, torch.tensor(10), torch.tensor([1, 999])])
def test_output_shape_equals_input(timestep):
    model = tiny_uvit(sample_size=8, in_channels=3)
    x, _, ctx = _inputs(model)
    out = model(x, timestep, encoder_hidden_states=ctx)
    assert out.sample.shape == x.shape
    assert model(x, timestep, ctx, return_dict=False)[0].shape == x.shape


def test_wrong_sizes_raise():
    model = tiny_uvit()
    x, t, ctx = _inputs(model)
    with pytest.raises(ValueError, match="text tokens"):
        model(x, t, ctx[:, :10])
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(2, 4, 8, 8), t, ctx)


def test_long_skips_are_last_in_first_out():
    model = tiny_uvit(depth=6)
    ins, skips = {}, {}
    for i, block in enumerate(model.in_blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: ins.__setitem__(i, out))
    for i, block in enumerate(model.out_blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: skips.__setitem__(i, args[1]))
    model(*_inputs(model))
    half = 3
    for i in range(half):
        assert torch.equal(skips[i], ins[half - 1 - i]), f"out-block {i} got the wrong skip"


def test_time_token_is_the_original_sinusoid_of_t_plus_one():
    """The original U-ViT embeds n in 1..1000 as [cos, sin] with freqs exp(-log(1e4) k / half), no MLP."""
    model = tiny_uvit()
    seen = {}
    model.in_blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    x, t, ctx = _inputs(model)
    model(x, t, ctx)
    half = model.config.embed_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() + 1)[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1) + model.pos_embed[0, 0]
    torch.testing.assert_close(seen["x"][:, 0], expected)


def test_unpatchify_matches_the_original_token_order():
    B, C, p, rows, cols = 2, 3, 2, 3, 4
    x = torch.randn(B, rows * cols, p * p * C)
    out = unpatchify(x, C, rows)
    ref = torch.empty(B, C, rows * p, cols * p)
    for h in range(rows):
        for w in range(cols):
            for p1 in range(p):
                for p2 in range(p):
                    for c in range(C):  # "B (h w) (p1 p2 C) -> B C (h p1) (w p2)"
                        ref[:, c, h * p + p1, w * p + p2] = x[:, h * cols + w, (p1 * p + p2) * C + c]
    assert torch.equal(out, ref)


def test_attention_equals_softmax_attention():
    model = tiny_uvit()
    attn = model.in_blocks[0].attn
    x = torch.randn(2, 7, model.config.embed_dim)
    B, N, D = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, D // h).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // h), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(attn(x), ref)


def test_guidance_conditioning_starts_at_zero_and_is_required():
    torch.manual_seed(0)
    plain = tiny_uvit()
    torch.manual_seed(0)
    cond = tiny_uvit(time_cond_proj_dim=16)
    cond.load_state_dict(plain.state_dict(), strict=False)
    x, t, ctx = _inputs(plain)
    w = torch.randn(2, 16)
    assert torch.equal(cond(x, t, ctx, timestep_cond=w).sample, plain(x, t, ctx).sample)
    with torch.no_grad():
        cond.cond_proj.weight.normal_()
    assert not torch.allclose(cond(x, t, ctx, timestep_cond=w).sample, plain(x, t, ctx).sample)
    with pytest.raises(ValueError, match="timestep_cond"):
        cond(x, t, ctx)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_uvit()
    x, t, ctx = _inputs(model)
    model(x, t, ctx).sample.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    model(x, t, ctx).sample.square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_uvit(time_cond_proj_dim=8)
    model.save_pretrained(tmp_path)
    loaded = UViT.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, ctx = _inputs(model)
    w = torch.randn(2, 8)
    assert torch.equal(loaded(x, t, ctx, timestep_cond=w).sample, model(x, t, ctx, timestep_cond=w).sample)
    assert loaded.config.in_channels == 4 and loaded.config.sample_size == 4 and TEXT_WIDTH == loaded.config.context_dim


def test_pooled_context_adds_the_mean_caption_embedding_to_every_patch_token(tmp_path):
    torch.manual_seed(0)
    pooled = tiny_uvit(pooled_context=True)
    plain = tiny_uvit()
    missing, unexpected = plain.load_state_dict(pooled.state_dict(), strict=False)
    assert not missing and {k.split(".")[0] for k in unexpected} == {"pooled_embed"}
    x, t, ctx = _inputs(pooled, batch=1)
    with torch.no_grad():
        # with one sample, adding W mean(ctx) + b to every patch token is a shift of the patch embedding's bias
        plain.patch_embed.bias += pooled.pooled_embed(ctx.mean(dim=1))[0]
        torch.testing.assert_close(pooled(x, t, ctx).sample, plain(x, t, ctx).sample)
    pooled.save_pretrained(tmp_path)
    loaded = UViT.from_pretrained(tmp_path)
    assert loaded.config.pooled_context
    # equal weights (the loaded copy's memory layout may block the kernels differently: last-bit differences)
    torch.testing.assert_close(loaded(x, t, ctx).sample, pooled(x, t, ctx).sample, rtol=1e-6, atol=1e-7)
