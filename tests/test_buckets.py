"""Aspect-ratio bucketing (data.buckets): geometry, single-bucket batches, the sampler over ranks and
resume, the latent cache keyed by bucket, WebDataset streams, SDXL time ids, and training runs (resume
and 2 processes equal one uninterrupted process)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ldmkit.data import BucketBatchSampler, Buckets, build_loader, most_common_bucket
from ldmkit.data.buckets import cover_size, crop_excess, header_size
from ldmkit.errors import UserError

from helpers.data import FakeEncoders, data_cfg, write_tar
from helpers.runs import launch_two, logged

STEP = 16  # resolution 32: buckets (16, 64), (16, 48), (32, 32), (48, 16), (64, 16)
# (width, height): 3 aspect ratios (about 3:1, 1:3, 1:1) with a little jitter, 8 images each
SIZES = [(84 + d, 30) for d in range(8)] + [(30, 84 + d) for d in range(8)] + [(40 + d, 40) for d in range(8)]


def _write_images(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"caption {i}\n")
    return root


@pytest.fixture(scope="module")
def three_aspects(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("aspects"))


def _cfg(path, **kw):
    return data_cfg(path, **{"buckets": True, "bucket_step": STEP, **kw})


def _check_batch(batch: dict, step: int = STEP) -> tuple[int, int]:
    """One bucket per batch; each sample cropped by at most one step from its cover size; returns (w, h)."""
    x = batch.get("pixel_values", batch.get("latent_moments"))
    h, w = batch["target_size"][0].tolist()
    assert (batch["target_size"] == torch.tensor([h, w])).all()
    if "pixel_values" in batch:
        assert tuple(x.shape[-2:]) == (h, w)
    for (oh, ow), (top, left) in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
        cw, ch = cover_size((ow, oh), (w, h))
        assert cw - w <= step and ch - h <= step
        assert 0 <= top <= ch - h and 0 <= left <= cw - w
    return w, h


def test_buckets_geometry():
    for res, step in [(512, 64), (768, 64), (1024, 64), (32, 16), (64, 16), (1024, 128)]:
        b = Buckets(res, step)
        assert (res // step * step, res // step * step) in b.sizes or res % step
        for w, h in b.sizes:
            assert w % step == 0 and h % step == 0 and w * h <= res * res and max(w / h, h / w) <= 4
        # every aspect ratio inside the bucket range is cropped by at most one step
        top = max(w / h for w, h in b.sizes)
        for i in range(401):
            a = math.exp(-math.log(top) + 2 * math.log(top) * i / 400)
            size = (round(1000 * a), 1000)
            assert crop_excess(size, b.assign(size)) <= step, (res, step, size)
    # the step follows the VAE: 8 x its downsampling factor (SD/SDXL: 8 -> 64 px)
    sd_vae = SimpleNamespace(vae_config={"block_out_channels": [128, 256, 512, 512]})
    assert Buckets.from_config(data_cfg("x", buckets=True, resolution=512), sd_vae).step == 64
    assert Buckets.from_config(data_cfg("x", buckets=False), sd_vae) is None
    with pytest.raises(UserError, match="below one bucket step"):
        Buckets.from_config(data_cfg("x", buckets=True, resolution=32), sd_vae)
    assert Buckets(32, 16).assign((90, 30)) == (48, 16)
    assert Buckets(32, 16).assign((30, 90)) == (16, 48)
    assert Buckets(32, 16).assign((40, 40)) == (32, 32)


def test_header_size_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decode_image gives 20 x 40
    im.save(tmp_path / "r.jpg", exif=exif)
    from ldmkit.data.transforms import decode_image

    assert header_size(tmp_path / "r.jpg") == decode_image(tmp_path / "r.jpg").size == (20, 40)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert header_size(tmp_path / "bad.png") is None


def test_batches_are_single_bucket_and_each_sample_once_per_epoch(three_aspects):
    loader = build_loader(_cfg(three_aspects), batch_size=4, seed=1)
    # 8 per bucket, global batch 4: 6 batches per epoch, nothing left out
    assert loader.batches_per_epoch == 6
    seen, buckets = [], set()
    for _ in range(12):
        batch = next(loader)
        buckets.add(_check_batch(batch))
        seen.append(batch["key"])
    assert buckets == {(48, 16), (16, 48), (32, 32)}
    for epoch in (seen[:6], seen[6:]):
        keys = [k for b in epoch for k in b]
        assert len(keys) == len(set(keys)) == 24
    assert seen[:6] != seen[6:]  # a new order each epoch


def test_sampler_ranks_and_resume_equal_one_process():
    bucket_of = [(1, 1)] * 11 + [(2, 1)] * 7 + [(1, 2)] * 5  # remainders 3, 3, 1 per epoch at global batch 4
    one = BucketBatchSampler(bucket_of, 4, seed=5)
    ranks = [BucketBatchSampler(bucket_of, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == 2 + 1 + 1
    assert one.dropped_per_epoch == 3 + 3 + 1
    for p in range(12):
        a = one.micro_batch(p)
        b = ranks[0].micro_batch(p) + ranks[1].micro_batch(p)
        assert a == b and len({bucket_of[i] for i, _ in a}) == 1
    for epoch in range(3):
        idx = [i for p in range(4 * epoch, 4 * epoch + 4) for i, _ in one.micro_batch(p)]
        assert len(idx) == len(set(idx)) == 16
    resumed = BucketBatchSampler(bucket_of, 4, seed=5, start_batch=7)
    it = iter(resumed)
    assert [next(it) for _ in range(5)] == [one.micro_batch(p) for p in range(7, 12)]
    with pytest.raises(UserError, match="no bucket holds one global batch"):
        BucketBatchSampler([(1, 1)] * 3 + [(2, 1)] * 3, 2, seed=0, world_size=2)


def test_cache_is_keyed_by_bucket(three_aspects, tmp_path):
    enc = FakeEncoders()
    common = dict(batch_size=4, seed=1, encoders=enc, cache_root=tmp_path / "cache")
    cached = build_loader(_cfg(three_aspects, cache=True), **common)
    plain = build_loader(_cfg(three_aspects), batch_size=4, seed=1)
    for _ in range(6):
        a, b = next(cached), next(plain)
        assert a["key"] == b["key"]
        w, h = _check_batch(a)
        assert a["latent_moments"].shape == (4, 8, h // 2, w // 2)
        for k in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(a[k], b[k])
        torch.testing.assert_close(a["latent_moments"], enc.encode_images(b["pixel_values"]), rtol=2e-3, atol=2e-3)
    folders = sorted(p for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 1
    with safe_open(str(folders[0] / "shard-00000.safetensors"), "pt") as f:
        assert {k for k in f.keys() if k.startswith("moments")} == {"moments@48x16", "moments@16x48", "moments@32x32"}
    # other bucket settings, or no buckets, give other caches
    build_loader(_cfg(three_aspects, cache=True, bucket_step=8), **common)
    build_loader(data_cfg(three_aspects, cache=True), **common)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_wds_buckets_within_the_shuffle_buffer(three_aspects, tmp_path):
    items = [
        (p.stem, p.read_bytes(), "png", [p.with_suffix(".txt").read_text().strip()])
        for p in sorted(three_aspects.glob("*.png"))
    ]
    order = np.random.default_rng(0).permutation(len(items))
    for s in range(3):
        write_tar(tmp_path / "wds" / f"{s}.tar", [items[i] for i in order[s * 8 : (s + 1) * 8]])
    cfg = _cfg(tmp_path / "wds", shuffle_buffer=6)
    loader = build_loader(cfg, batch_size=2, seed=3)
    batches = [next(loader) for _ in range(14)]
    for b in batches:
        _check_batch(b)
    keys = [k for b in batches[:12] for k in b["key"]]
    assert len(set(keys)) >= 20  # one epoch: 24 samples, at most one pending sample per bucket dropped
    resumed = build_loader(cfg, batch_size=2, seed=3, start_batch=5)
    for b in batches[5:14]:
        r = next(resumed)
        assert r["key"] == b["key"] and torch.equal(r["pixel_values"], b["pixel_values"])


def test_sdxl_time_ids_match_each_image(three_aspects, tiny_sdxl):
    from ldmkit.config import ModelConfig
    from ldmkit.families import load_family

    family = load_family(ModelConfig(pretrained=str(tiny_sdxl)))
    loader = build_loader(_cfg(three_aspects, center_crop=False), batch_size=4, seed=2)
    for _ in range(6):
        batch = next(loader)
        w, h = _check_batch(batch)
        ids = family.add_time_ids(batch, resolution=32)
        for row, (oh, ow), (top, left) in zip(
            ids.tolist(), batch["original_size"].tolist(), batch["crop_top_left"].tolist()
        ):
            assert row == [oh, ow, top, left, h, w]
        fixed = family.add_time_ids(batch, resolution=32, fix_crop_and_size=True)
        assert fixed.tolist() == [[h, w, 0, 0, h, w]] * 4
    assert family.loaded("vae") is False  # nothing was loaded for this


def test_validation_size_and_uvit_refusal(three_aspects, tmp_path):
    from ldmkit.methods import load_config

    assert most_common_bucket(_cfg(three_aspects)) in {(48, 16), (16, 48), (32, 32)}
    skewed = _write_images(tmp_path / "skewed")
    for p in list(skewed.glob("img1*.png")):  # drop most tall and square images
        p.unlink()
    assert most_common_bucket(_cfg(skewed)) == (48, 16)
    assert most_common_bucket(data_cfg(skewed)) is None
    with pytest.raises(UserError, match="validation_width must be a multiple of 8"):
        load_config(None, ["--method.name=lora", "--method.validation_width=30"])
    with pytest.raises(UserError, match="uvit keeps its fixed latent grid"):
        load_config(None, ["--method.name=uvit", "--data.buckets=true"])


def _toy(tmp: Path, data: Path, name: str, *extra: str) -> list[str]:
    return [
        "--method.name=toy",
        f"--data.path={data}",
        "--data.resolution=32",
        "--data.buckets=true",
        f"--data.bucket_step={STEP}",
        "--data.random_flip=true",
        "--data.num_workers=0",
        "--train.max_steps=6",
        "--train.learning_rate=1e-2",
        "--train.seed=3",
        "--train.checkpoint_every=3",
        "--train.report_to=none",
        f"--output_dir={tmp / name}",
        *extra,
    ]


@pytest.mark.slow
def test_bucketed_resume_and_two_processes_equal_one_run(three_aspects, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    from helpers.toy_method import ToyMethod

    train(load_config(None, _toy(tmp_path, three_aspects, "full", "--train.batch_size=4")))
    monkeypatch.setattr(ToyMethod, "crash_at_step", 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(None, _toy(tmp_path, three_aspects, "killed", "--train.batch_size=4")))
    monkeypatch.setattr(ToyMethod, "crash_at_step", 0)
    train(load_config(None, _toy(tmp_path, three_aspects, "killed", "--train.batch_size=4")))
    assert logged(tmp_path / "killed") == logged(tmp_path / "full")

    r = subprocess.run(
        [*launch_two(), "-m", "ldmkit", "train", *_toy(tmp_path, three_aspects, "two", "--train.batch_size=2")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "full"), rel=1e-5)
    full = load_file(str(tmp_path / "full" / "export" / "toy.safetensors"))
    for name, other in (("killed", 0), ("two", 1e-5)):
        got = load_file(str(tmp_path / name / "export" / "toy.safetensors"))
        for k in full:
            torch.testing.assert_close(got[k], full[k], rtol=other, atol=other)


@pytest.mark.slow
def test_sdxl_lcm_lora_trains_on_buckets_from_the_cache(three_aspects, tiny_sdxl, tmp_path):
    """lcm_lora on the tiny SDXL with buckets and the latent cache: resumed equals uninterrupted, and the
    validation grid has the most common bucket's shape."""
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    def cfg(name, steps):
        return load_config(
            "lcm_lora/debug_sdxl",
            [
                f"--model.pretrained={tiny_sdxl}",
                f"--data.path={three_aspects}",
                "--data.buckets=true",
                f"--data.bucket_step={STEP}",  # the tiny VAE's factor is 8: 64 px steps, above 32 px
                "--data.cache=true",
                "--data.num_workers=0",
                f"--data.cache_dir={tmp_path / 'cache'}",
                "--train.batch_size=2",
                f"--train.max_steps={steps}",
                "--train.checkpoint_every=2",
                "--train.validate_every=0",
                "--train.validation_prompts=[a red circle]",
                "--method.validation_steps=[1]",
                "--train.report_to=none",
                f"--output_dir={tmp_path / name}",
            ],
        )

    train(cfg("full", 4))
    train(cfg("part", 2))
    train(cfg("part", 4))
    assert logged(tmp_path / "part") == pytest.approx(logged(tmp_path / "full"), rel=1e-5)
    grid = sorted((tmp_path / "full" / "samples").glob("*.png"))[-1]
    # the three buckets are equally common (8 images each): one of them, as the log line says
    # one prompt x one step count: the grid is one cell (blown up to fit its labels) plus the label bands
    from ldmkit.inference import label_margins

    sizes = set()
    for w, h in ((48, 16), (16, 48), (32, 32)):
        left, top, scale = label_margins((w, h), True, True)
        sizes.add((left + w * scale, top + h * scale))
    assert Image.open(grid).size in sizes
