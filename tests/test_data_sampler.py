"""Global-batch sampler, loader resume, and WebDataset per-rank / per-worker splitting."""

from __future__ import annotations

import torch

from ldmkit.data import GlobalBatchSampler, build_loader
from ldmkit.data.wds import WdsDataset
from ldmkit.rng import sample_seed

from helpers.data import data_cfg, items, layouts, make_items, write_folder, write_wds  # noqa: F401 (fixtures)


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_two_ranks_split_the_one_rank_global_batches():
    n, b, epochs = 23, 3, 3
    one = GlobalBatchSampler(n, 2 * b, seed=5)
    r0 = GlobalBatchSampler(n, b, seed=5, rank=0, world_size=2)
    r1 = GlobalBatchSampler(n, b, seed=5, rank=1, world_size=2)
    assert one.batches_per_epoch == r0.batches_per_epoch == 3  # 23 // 6, tail of 5 dropped
    steps = epochs * one.batches_per_epoch
    g1, g0, g1r = _take(one, steps), _take(r0, steps), _take(r1, steps)
    for a, x, y in zip(g1, g0, g1r):
        assert a == x + y  # same (index, seed) pairs, rank 0 first
        assert not {i for i, _ in x} & {i for i, _ in y}
    for e in range(epochs):
        epoch = [i for batch in g1[e * 3 : (e + 1) * 3] for i, _ in batch]
        assert len(epoch) == len(set(epoch)) == 18  # each sample at most once per epoch
        assert all(s == sample_seed(5, e, i) for batch in g1[e * 3 : (e + 1) * 3] for i, s in batch)
    assert [i for i, _ in g1[0]] != [i for i, _ in g1[3]]  # a new permutation each epoch


def test_sampler_resume_position():
    fresh = _take(GlobalBatchSampler(17, 2, seed=1, rank=1, world_size=2), 12)
    resumed = _take(GlobalBatchSampler(17, 2, seed=1, rank=1, world_size=2, start_batch=5), 7)
    assert resumed == fresh[5:]


def test_loader_resume_with_workers(layouts):
    cfg = data_cfg(layouts["folder"], num_workers=2, center_crop=False, random_flip=True)
    loader = build_loader(cfg, batch_size=3, seed=2)
    fresh = [next(loader) for _ in range(6)]
    loader.close()
    resumed = build_loader(cfg, batch_size=3, seed=2, start_batch=4)
    assert resumed.epoch == 2 and resumed.batches_per_epoch == 2
    for a, b in zip(fresh[4:], [next(resumed), next(resumed)]):
        assert a["key"] == b["key"] and torch.equal(a["pixel_values"], b["pixel_values"])
    resumed.close()
    # The loader owns its RNG: the global torch stream is untouched.
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    other = build_loader(cfg, batch_size=3, seed=2)
    next(other)
    other.close()
    assert torch.equal(torch.rand(1), expected)


def test_wds_units_partition_each_epoch(tmp_path):
    all_items = make_items(12)
    keys = {k for k, *_ in all_items}
    # 4 shards for 4 units: shard-level split; 2 shards for 4 units: sample-level split.
    for per_shard in (3, 6):
        root = write_wds(tmp_path / f"w{per_shard}", all_items, per_shard=per_shard)
        for epoch_count in (1, 2):
            ds = WdsDataset(str(root), data_cfg(root, shuffle_buffer=4), seed=3)
            seen = [[s["key"] for s in ds.iter_unit(u, 4, epochs=epoch_count)] for u in range(4)]
            flat = [k for unit in seen for k in unit]
            assert len(flat) == 12 * epoch_count and set(flat) == keys
            if epoch_count == 1:
                assert len(set(flat)) == 12


def test_wds_loader_ranks_and_workers_without_duplicates(tmp_path):
    root = write_wds(tmp_path / "w", make_items(12), per_shard=3)  # 4 shards, 2 ranks x 2 workers
    cfg = data_cfg(root, num_workers=2, shuffle_buffer=8)
    keys, seeds = [], []
    for rank in range(2):
        loader = build_loader(cfg, batch_size=3, seed=4, rank=rank, world_size=2)
        assert loader.num_samples == 12 and loader.batches_per_epoch == 2
        for _ in range(2):
            batch = next(loader)
            keys += batch["key"]
            seeds += batch["seed"].tolist()
        loader.close()
    assert sorted(keys) == sorted(k for k, *_ in make_items(12))
    assert seeds == [sample_seed(4, 0, k) for k in keys]


def test_wds_resume_continues_the_stream(tmp_path):
    root = write_wds(tmp_path / "w", make_items(10), per_shard=2)
    cfg = data_cfg(root, num_workers=2, shuffle_buffer=3)
    loader = build_loader(cfg, batch_size=2, seed=1)
    fresh = [next(loader)["key"] for _ in range(9)]
    loader.close()
    resumed = build_loader(cfg, batch_size=2, seed=1, start_batch=5)
    assert [next(resumed)["key"] for _ in range(4)] == fresh[5:]
    resumed.close()
