"""Readers and transforms: every layout gives the same batch; broken data is skipped or refused."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data import Draws, ImageTransform, build_loader, collate, detect_format, open_dataset
from ldmkit.data.filelist import FileListDataset
from ldmkit.data.folder import FolderDataset
from ldmkit.data.transforms import decode_image
from ldmkit.data.wds import WdsDataset, iter_shard
from ldmkit.errors import UserError
from ldmkit.rng import sample_seed

from helpers.data import (  # noqa: F401 (fixtures)
    data_cfg,
    items,
    layouts,
    make_items,
    write_filelist,
    write_folder,
    write_imagefolder,
    write_tar,
    write_wds,
)

AUG = dict(center_crop=False, random_flip=True, proportion_empty_prompts=0.3)


def test_transform_geometry():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 40, 3), dtype=np.uint8))  # h=60, w=40
    tf = ImageTransform(32, center_crop=True, random_flip=True, interpolation="bicubic")
    draws = Draws(flip=0.9, crop_top=0.0, crop_left=0.0, caption=0.0, drop=1.0)
    t = tf(img, draws)
    # shorter side (w 40) -> 32, longer int(32 * 60 / 40) = 48; centre crop top round(16 / 2) = 8
    ref = img.resize((32, 48), Image.Resampling.BICUBIC).crop((0, 8, 32, 40))
    expected = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert t.original_size == (60, 40) and t.crop_top_left == (8, 0) and not t.flipped
    assert torch.allclose(t.pixel_values, expected) and t.pixel_values.min() >= -1 and t.pixel_values.max() <= 1
    flipped = tf(img, Draws(0.1, 0.0, 0.0, 0.0, 1.0))
    assert flipped.flipped and torch.equal(flipped.pixel_values, t.pixel_values.flip(-1))

    wide = img.transpose(Image.Transpose.ROTATE_90)  # h=40, w=60 -> resized 48 x 32
    rc = ImageTransform(32, center_crop=False, random_flip=True)
    lefts = set()
    for seed in range(40):
        d = Draws.from_seed(seed)
        t = rc(wide, d)
        top, left = t.crop_top_left
        assert top == 0 and 0 <= left <= 16 and t.pixel_values.shape == (3, 32, 32)
        unflipped = rc(wide, d, flip=False)
        if t.flipped:  # the crop in the mirrored image starts where the unflipped one ends, mirrored
            assert left == 48 - unflipped.crop_top_left[1] - 32
        lefts.add(unflipped.crop_top_left[1])
    assert len(lefts) > 5


def _samples(ds, seeds):
    return [ds[(i, s)] for i, s in enumerate(seeds)]


def test_same_batch_from_every_layout(layouts, items):
    seeds = [sample_seed(7, 0, key) for key, *_ in items]
    batches = {}
    for name in ("folder", "imagefolder", "filelist"):
        ds = open_dataset(data_cfg(layouts[name], **AUG))
        assert len(ds) == 8
        batches[name] = collate(_samples(ds, seeds))
    assert detect_format(str(layouts["wds"])) == "wds" and detect_format(str(layouts["filelist"])) == "filelist"
    wds = WdsDataset(str(layouts["wds"]), data_cfg(layouts["wds"], **AUG), seed=7, world_size=1)
    streamed = sorted(wds.iter_unit(0, 1, epochs=1), key=lambda s: s["key"])
    batches["wds"] = collate(streamed)
    ref = batches["folder"]
    assert ref["key"] == [k for k, *_ in items] and ref["pixel_values"].shape == (8, 3, 32, 32)
    assert "" in ref["captions"] and any(c for c in ref["captions"])  # dropout happens, not always
    for name, b in batches.items():
        for k in ("pixel_values", "original_size", "crop_top_left", "seed"):
            assert torch.equal(b[k], ref[k]), (name, k)
        assert b["captions"] == ref["captions"], name
        if name != "filelist":
            assert b["key"] == ref["key"], name
    # A different seed changes the augmentation.
    other = collate(_samples(open_dataset(data_cfg(layouts["folder"], **AUG)), [s + 1 for s in seeds]))
    assert not torch.equal(other["pixel_values"], ref["pixel_values"])


def test_same_batches_through_loaders(layouts):
    got = {}
    for name in ("folder", "imagefolder", "filelist"):
        loader = build_loader(data_cfg(layouts[name], **AUG), batch_size=4, seed=3)
        got[name] = [next(loader) for _ in range(4)]  # two epochs of 2 batches
        assert loader.epoch == 2 and loader.batches_per_epoch == 2 and loader.num_samples == 8
    for name in ("imagefolder", "filelist"):
        for a, b in zip(got["folder"], got[name]):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]
    first_epoch = got["folder"][0]["seed"].tolist() + got["folder"][1]["seed"].tolist()
    assert len(set(first_epoch)) == 8


def test_several_captions(tmp_path):
    its = make_items(4, multi=True)
    for ds in (
        FolderDataset(write_folder(tmp_path / "f", its), data_cfg(tmp_path)),
        FolderDataset(write_imagefolder(tmp_path / "m", its), data_cfg(tmp_path)),
    ):
        assert ds.load(0).captions == its[0][3] and len(ds.load(0).captions) == 3
        chosen = {ds[(0, s)]["captions"] for s in range(60)}
        assert chosen == set(its[0][3])


def test_truncated_image_skipped_and_counted(tmp_path, items):
    broken = list(items)
    key, data, ext, caps = broken[2]
    broken[2] = (key, data[: len(data) // 2], ext, caps)
    root = write_folder(tmp_path / "f", broken)
    with pytest.raises(OSError):
        decode_image(root / f"{key}.{ext}")
    loader = build_loader(data_cfg(root), batch_size=4, seed=0)
    keys = [k for _ in range(4) for k in next(loader)["key"]]
    assert key not in keys and len(keys) == 16
    assert loader.skipped == 2  # once per epoch

    write_wds(tmp_path / "w", broken, per_shard=4)
    wds = WdsDataset(str(tmp_path / "w"), data_cfg(tmp_path / "w"))
    out = list(wds.iter_unit(0, 1, epochs=1))
    assert len(out) == 7 and key not in {s["key"] for s in out}
    assert sum(s.get("_skipped", 0) for s in out) == 1


def test_empty_or_unreadable_dataset_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        build_loader(data_cfg(tmp_path / "empty"), batch_size=1, seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="no readable image in .*bad"):
        build_loader(data_cfg(bad), batch_size=1, seed=0)
    write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(UserError, match="no samples"):
        build_loader(data_cfg(tmp_path / "empty.tar"), batch_size=1, seed=0)
    with pytest.raises(UserError, match="does not exist"):
        build_loader(data_cfg(tmp_path / "missing"), batch_size=1, seed=0)
    with pytest.raises(UserError, match="fewer than one global batch"):
        build_loader(data_cfg(write_folder(tmp_path / "two", make_items(2))), batch_size=2, seed=0, world_size=2)


def test_pipe_urls_need_opt_in(layouts):
    shard = sorted(layouts["wds"].glob("*.tar"))[0]
    url = f"pipe:cat {shard}"
    with pytest.raises(UserError, match="allow_shell"):
        build_loader(data_cfg(url), batch_size=1, seed=0)
    ds = WdsDataset(url, data_cfg(url, allow_shell=True))
    assert [s["key"] for s in ds.iter_unit(0, 1, epochs=1)] == [f"img{i:03d}" for i in range(3)]


def test_wds_shard_end_marker_and_json_captions(tmp_path, items):
    path = tmp_path / "j.tar"
    with tarfile.open(path, "w") as tf:
        for key, data, ext, caps in items[:2]:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", f'{{"caption": "{caps[0]}"}}'.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    raws = list(iter_shard(str(path))) + list(iter_shard(str(path)))
    assert len(raws) == 4 and all("__key__" in r for r in raws)
    ds = WdsDataset(f"{path}::{path}", data_cfg(path, shuffle_buffer=0))
    assert ds.count() == 4
    assert [s["captions"] for s in ds.iter_unit(0, 1, epochs=1)][:2] == ["caption 0 a", "caption 1 a"]


def test_filelist_round_trip(tmp_path, items):
    path = write_filelist(tmp_path / "fl", items, parts=2)
    ds = FileListDataset(path, data_cfg(path))
    assert len(ds) == 8 and any(p.suffix == ".gz" for p in ds.parts)
    for i in (0, 5, 3, 7, 1):  # random access across plain and gzipped parts
        raw = ds.load(i)
        assert raw.captions == [items[i][3][0]]
        assert np.array_equal(np.asarray(raw.image), np.asarray(decode_image(items[i][1])))
    assert ds.load(5).key == "part-1.txt.gz:1"
    # Weights: list 0 gets 3/4 of an epoch (its 4 lines repeated), list 1 a quarter (every other line).
    weighted = FileListDataset(write_filelist(tmp_path / "w", items, parts=2, weights=[3, 1]), data_cfg(path))
    assert len(weighted) == 8
    assert [weighted.load(i).captions[0][-3] for i in range(8)] == list("00122346")


def test_wds_brace_patterns_and_fsspec_urls(layouts, items):
    import fsspec

    pattern = f"{layouts['wds']}/shard-{{000..002}}.tar"
    local = build_loader(data_cfg(pattern, shuffle_buffer=0), batch_size=8, seed=0)
    assert local.num_samples == 8 and sorted(next(local)["key"]) == [k for k, *_ in items]
    fs = fsspec.filesystem("memory")
    for shard in sorted(layouts["wds"].glob("*.tar")):
        fs.pipe(f"/h2-test/{shard.name}", shard.read_bytes())
    remote = build_loader(data_cfg("memory://h2-test/shard-{000..002}.tar", shuffle_buffer=0), batch_size=8, seed=0)
    a, b = next(remote), next(build_loader(data_cfg(pattern, shuffle_buffer=0), batch_size=8, seed=0))
    assert remote.num_samples == 8 and a["key"] == b["key"] and torch.equal(a["pixel_values"], b["pixel_values"])
