"""Latent / text-embedding cache: equal to direct encoding, reused, invalidated, resumable, multi-rank."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace

import pytest
import torch

from ldmkit.data import Draws, build_loader, open_dataset
from ldmkit.data.cache import CacheDataset, build_cache
from ldmkit.rng import sample_seed

from helpers.data import FakeEncoders, data_cfg, fake_encoders, items, layouts, make_items, write_folder  # noqa: F401
from helpers.threads import thread_env

TOL = dict(rtol=3e-3, atol=3e-3)  # float16 storage


def _build(ds, enc, root, cfg, **kw):
    return build_cache(ds, enc, root, cfg, batch_size=3, shard_size=3, **kw)


@pytest.fixture()
def multi_folder(tmp_path):
    return write_folder(tmp_path / "data", make_items(7, multi=True))


def test_cache_equals_direct_encoding(multi_folder, tmp_path, fake_encoders):
    cfg = data_cfg(multi_folder, random_flip=True, proportion_empty_prompts=0.25)
    source = open_dataset(cfg)
    cache = _build(source, fake_encoders, tmp_path / "cache", cfg)
    assert isinstance(cache, CacheDataset) and len(cache) == 7
    empty = fake_encoders.encode_prompts([""])
    flips, dropped, captions = set(), 0, set()
    for i in range(7):
        for epoch in range(4):
            seed = sample_seed(0, epoch, i)
            ref, got = source[(i, seed)], cache[(i, seed)]
            assert got["key"] == ref["key"] and got["captions"] == ref["captions"]
            assert torch.equal(got["original_size"], ref["original_size"])
            assert torch.equal(got["crop_top_left"], ref["crop_top_left"])
            moments = fake_encoders.encode_images(ref["pixel_values"][None])[0]
            assert got["latent_moments"].dtype == torch.float32 and got["latent_moments"].shape == (8, 16, 16)
            torch.testing.assert_close(got["latent_moments"], moments, **TOL)
            text = fake_encoders.encode_prompts([ref["captions"]]) if ref["captions"] else empty
            torch.testing.assert_close(got["prompt_embeds"], text["prompt_embeds"][0], **TOL)
            torch.testing.assert_close(got["pooled_prompt_embeds"], text["pooled_prompt_embeds"][0], **TOL)
            flips.add(source.builder.transform.wants_flip(Draws.from_seed(seed)))
            dropped += got["captions"] == ""
            captions.add(got["captions"])
    assert flips == {False, True}  # both stored orientations were compared
    assert 0 < dropped < 28 and len(captions) > 8  # dropout and several captions per sample both happen


def test_cache_reused_and_invalidated(multi_folder, tmp_path):
    cfg = data_cfg(multi_folder)
    enc = FakeEncoders()
    first = _build(open_dataset(cfg), enc, tmp_path / "cache", cfg)
    assert enc.image_calls > 0
    enc.image_calls = enc.prompt_calls = 0
    again = _build(open_dataset(cfg), enc, tmp_path / "cache", cfg)
    assert enc.image_calls == enc.prompt_calls == 0 and again.folder == first.folder

    cfg48 = replace(cfg, resolution=48)
    other = _build(open_dataset(cfg48), enc, tmp_path / "cache", cfg48)
    assert enc.image_calls > 0 and other.folder != first.folder
    assert other[(0, 0)]["latent_moments"].shape[-1] == 24

    enc.image_calls = 0
    txt = multi_folder / "img003.txt"
    txt.write_text("a new caption\n")
    os.utime(txt, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = _build(open_dataset(cfg), enc, tmp_path / "cache", cfg)
    assert enc.image_calls > 0 and changed.folder not in (first.folder, other.folder)
    assert changed.captions[1][0] == ["a new caption"]  # sample 3 = shard 1, row 0


class _LazyFakeEncoders:
    """Loads its models (FakeEncoders) on first use like a model family; ``transient`` drops what was
    loaded inside; ``use_encoded_prompt`` records the hand-over of the cache's empty prompt."""

    def __init__(self):
        self.loads, self.models, self.handed = 0, None, {}

    def fingerprint(self) -> str:
        return FakeEncoders().fingerprint()

    def _loaded(self) -> FakeEncoders:
        if self.models is None:
            self.loads += 1
            self.models = FakeEncoders()
        return self.models

    def encode_images(self, x):
        return self._loaded().encode_images(x)

    def encode_prompts(self, captions):
        return self._loaded().encode_prompts(captions)

    @contextlib.contextmanager
    def transient(self):
        before = self.models
        yield
        if before is None:
            self.models = None

    def use_encoded_prompt(self, caption, embeds):
        self.handed[caption] = embeds


def test_loader_decides_the_cache_and_loads_encoders_only_to_build(multi_folder, tmp_path):
    """Finding a finished cache needs the fingerprint only; building loads the models once and drops them;
    the cache's empty-prompt embedding is handed to the encoders; without data.cache nothing is encoded."""
    cfg = data_cfg(multi_folder, cache=True)
    enc = _LazyFakeEncoders()
    loader = build_loader(cfg, batch_size=2, seed=0, encoders=enc, cache_root=tmp_path / "cache")
    assert enc.loads == 1 and enc.models is None and "latent_moments" in next(loader)
    empty = FakeEncoders().encode_prompts([""])
    torch.testing.assert_close(enc.handed[""]["prompt_embeds"], empty["prompt_embeds"][0], atol=1e-3, rtol=1e-3)
    enc = _LazyFakeEncoders()
    loader = build_loader(cfg, batch_size=2, seed=0, encoders=enc, cache_root=tmp_path / "cache")
    assert enc.loads == 0 and "" in enc.handed and "latent_moments" in next(loader)
    enc = _LazyFakeEncoders()
    loader = build_loader(replace(cfg, cache=False), batch_size=2, seed=0, encoders=enc, cache_root=tmp_path / "c2")
    assert enc.loads == 0 and enc.handed == {} and "pixel_values" in next(loader)


def test_cache_build_resumes(multi_folder, tmp_path):
    cfg = data_cfg(multi_folder, random_flip=True)
    # shard_size 3 -> shards of 3, 3, 1 samples; with flips each shard encodes 2 image batches.
    enc = FakeEncoders(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        _build(open_dataset(cfg), enc, tmp_path / "cache", cfg)
    folder = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in folder.glob("shard-*.safetensors")) == ["shard-00000.safetensors"]
    assert not (folder / "index.json").exists()
    enc.fail_after, enc.image_calls = None, 0
    resumed = _build(open_dataset(cfg), enc, tmp_path / "cache", cfg)
    assert enc.image_calls == 4  # shards 1 and 2 only
    fresh = _build(open_dataset(cfg), FakeEncoders(), tmp_path / "fresh", cfg)
    for i in range(7):
        a, b = resumed[(i, 11 + i)], fresh[(i, 11 + i)]
        assert torch.equal(a["latent_moments"], b["latent_moments"]) and a["captions"] == b["captions"]


class Barrier(Exception):
    pass


class FakeRank:
    """Rank 1 of 2 stops at the first barrier; rank 0 passes (sequential stand-in for two processes)."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world

    def wait_for_everyone(self) -> None:
        if self.process_index:
            raise Barrier


def test_ranks_encode_their_own_shards(multi_folder, tmp_path):
    cfg = data_cfg(multi_folder)
    encoders = [FakeEncoders(), FakeEncoders()]
    # Rank 1 first (its "wait" returns at once), then rank 0 finishes and writes the index.
    with pytest.raises(Barrier):
        _build(open_dataset(cfg), encoders[1], tmp_path / "cache", cfg, accelerator=FakeRank(1, 2))
    assert encoders[1].image_calls == 1  # shard 1 of 0..2
    cache = _build(open_dataset(cfg), encoders[0], tmp_path / "cache", cfg, accelerator=FakeRank(0, 2))
    assert encoders[0].image_calls == 2
    single = _build(open_dataset(cfg), FakeEncoders(), tmp_path / "single", cfg)
    for i in range(7):
        torch.testing.assert_close(cache[(i, i)]["latent_moments"], single[(i, i)]["latent_moments"], rtol=0, atol=0)


def test_loader_trains_from_the_cache(layouts, tmp_path, items):
    for name in ("folder", "wds"):
        cfg = data_cfg(layouts[name], cache=True, encode_batch_size=4, num_workers=1)
        enc = FakeEncoders()
        loader = build_loader(cfg, batch_size=4, seed=0, encoders=enc, cache_root=tmp_path / name)
        batch = next(loader)
        assert "pixel_values" not in batch and batch["latent_moments"].shape == (4, 8, 16, 16)
        assert batch["prompt_embeds"].shape == (4, 8, 16) and batch["seed"].dtype == torch.int64
        assert loader.num_samples == 8 and enc.image_calls == 2
        loader.close()


RANK_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from helpers.data import FakeEncoders, data_cfg
import ldmkit.data.cache
from ldmkit.data import build_loader

ldmkit.data.cache.SHARD_SIZE = 2  # 4 shards: both ranks encode
acc = Accelerator(cpu=True)
enc = FakeEncoders()
cfg = data_cfg({data!r}, cache=True, encode_batch_size=2, random_flip=True)
loader = build_loader(cfg, batch_size=2, seed=9, rank=acc.process_index, world_size=acc.num_processes,
                      encoders=enc, cache_root={cache!r})
out = [dict(key=b["key"], m=b["latent_moments"].sum((1, 2, 3)).tolist()) for b in (next(loader) for _ in range(4))]
Path({out!r}, f"rank{{acc.process_index}}.json").write_text(json.dumps(dict(batches=out, calls=enc.image_calls)))
"""


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(layouts, tmp_path):
    import json
    import subprocess
    from pathlib import Path

    import ldmkit.data.cache

    script = tmp_path / "ranks.py"
    script.write_text(
        RANK_SCRIPT.format(
            tests=str(Path(__file__).parent),
            data=str(layouts["folder"]),
            cache=str(tmp_path / "cache"),
            out=str(tmp_path),
        )
    )
    env = thread_env()
    from helpers.runs import launch_two

    cmd = [*launch_two(), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["calls"] > 0 and ranks[1]["calls"] > 0  # both ranks encoded shards
    assert len(list((tmp_path / "cache").glob("*/shard-*.safetensors"))) == 4

    # One process with the global batch sees the same samples and tensors.
    old = ldmkit.data.cache.SHARD_SIZE
    ldmkit.data.cache.SHARD_SIZE = 2
    try:
        cfg = data_cfg(layouts["folder"], cache=True, encode_batch_size=2, random_flip=True)
        single = build_loader(cfg, batch_size=4, seed=9, encoders=FakeEncoders(), cache_root=tmp_path / "single")
        for g in range(4):
            b = next(single)
            assert b["key"] == ranks[0]["batches"][g]["key"] + ranks[1]["batches"][g]["key"]
            sums = ranks[0]["batches"][g]["m"] + ranks[1]["batches"][g]["m"]
            torch.testing.assert_close(b["latent_moments"].sum((1, 2, 3)), torch.tensor(sums), rtol=1e-5, atol=1e-4)
    finally:
        ldmkit.data.cache.SHARD_SIZE = old


@pytest.mark.slow
def test_cache_with_sdxl_models(layouts, tmp_path, tiny_sdxl):
    """The real encoders (the SDXL family, tiny SDXL: prompt + pooled embeddings) through the cache."""
    from ldmkit.config import ModelConfig
    from ldmkit.families import load_family

    models = load_family(ModelConfig(pretrained=str(tiny_sdxl)))
    cfg = data_cfg(layouts["folder"], random_flip=True, proportion_empty_prompts=0.3)
    source = open_dataset(cfg)
    cache = build_cache(source, models, tmp_path / "cache", cfg, batch_size=4)
    for i in range(8):
        seed = sample_seed(1, 0, i)
        ref, got = source[(i, seed)], cache[(i, seed)]
        torch.testing.assert_close(got["latent_moments"], models.encode_images(ref["pixel_values"][None])[0], **TOL)
        text = models.encode_prompts([ref["captions"]])
        assert set(text) == {"prompt_embeds", "pooled_prompt_embeds"}
        for k, v in text.items():
            torch.testing.assert_close(got[k], v[0].float(), **TOL)
