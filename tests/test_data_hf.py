"""Hugging Face ``datasets`` sources (save_to_disk folder, parquet, arrow) train like the image folder they
were made from: the same samples, captions, batches per rank, and the same toy-method losses."""

from __future__ import annotations

import sys

import pytest
import torch

from ldmkit.data import build_loader, detect_format, open_dataset
from ldmkit.errors import UserError
from ldmkit.methods import load_config
from ldmkit.train.loop import train

from helpers.data import data_cfg, make_items, write_folder
from helpers.runs import logged

datasets = pytest.importorskip("datasets")
AUG = dict(center_crop=False, random_flip=True, proportion_empty_prompts=0.2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 8 samples (some with several captions) as an image folder and as datasets sources."""
    root = tmp_path_factory.mktemp("hf")
    items = make_items(8, multi=True)
    folder = write_folder(root / "folder", items)
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": f"{key}.{ext}"} for key, data, ext, _ in items],  # folder order
            "caption": [caps for *_, caps in items],
            "other": list(range(len(items))),
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "train.parquet"))
    hub = root / "hub" / "data"
    hub.mkdir(parents=True)
    ds.select(range(5)).to_parquet(str(hub / "train-00000-of-00002.parquet"))
    ds.select(range(5, 8)).to_parquet(str(hub / "train-00001-of-00002.parquet"))
    arrow = next((root / "saved").glob("*.arrow"))
    return {
        "folder": folder,
        "saved": root / "saved",
        "dict": root / "dict",
        "parquet": root / "train.parquet",
        "hub": root / "hub",
        "arrow": arrow,
    }


HF = ["saved", "dict", "parquet", "hub", "arrow"]


@pytest.mark.parametrize("kind", HF)
def test_same_samples_as_the_folder(sources, kind):
    assert detect_format(str(sources[kind])) == "datasets"
    ref = open_dataset(data_cfg(sources["folder"], **AUG))
    ds = open_dataset(data_cfg(sources[kind], caption_column="caption", **AUG))
    assert len(ds) == len(ref) == 8
    for index in range(8):
        assert ds.load(index).captions == ref.load(index).captions
        for seed in (index, 1000 + index):
            a, b = ds[(index, seed)], ref[(index, seed)]
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            assert a["captions"] == b["captions"]
            for k in ("original_size", "crop_top_left"):
                assert a[k].tolist() == b[k].tolist()
    assert len(open_dataset(data_cfg(sources[kind], caption_column="caption", max_samples=3))) == 3


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_batches_per_rank_and_worker_equal_the_folders(sources, kind):
    def batches(path, rank, world, workers, n=4):
        cfg = data_cfg(path, caption_column="caption", num_workers=workers, **AUG)
        loader = build_loader(cfg, batch_size=4 // world, seed=5, rank=rank, world_size=world)
        out = [next(loader) for _ in range(n)]
        loader.close()
        return out

    ref = batches(sources["folder"], 0, 1, 0)
    one = batches(sources[kind], 0, 1, 2)  # two worker processes: the dataset is pickled to them
    halves = [batches(sources[kind], r, 2, 0) for r in range(2)]
    for i, b in enumerate(ref):
        assert one[i]["captions"] == b["captions"] and torch.equal(one[i]["pixel_values"], b["pixel_values"])
        assert torch.equal(one[i]["seed"], b["seed"])
        both = torch.cat([halves[0][i]["pixel_values"], halves[1][i]["pixel_values"]])
        assert torch.equal(both, b["pixel_values"])
        assert halves[0][i]["captions"] + halves[1][i]["captions"] == b["captions"]


def test_toy_run_on_parquet_equals_the_folder_run(sources, tmp_path):
    def run(path, name):
        cfg = load_config(
            None,
            [
                "--method.name=toy",
                f"--data.path={path}",
                "--data.caption_column=caption",
                "--data.resolution=16",
                "--data.num_workers=0",
                "--data.random_flip=true",
                "--train.batch_size=4",
                "--train.max_steps=2",
                "--train.seed=3",
                "--train.report_to=none",
                f"--output_dir={tmp_path / name}",
            ],
        )
        train(cfg)
        return logged(tmp_path / name)

    folder = run(sources["folder"], "folder")
    assert len(folder) == 2
    assert run(sources["parquet"], "parquet") == folder
    assert run(sources["saved"], "saved") == folder


def test_bad_datasets_inputs_are_one_line(sources, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no column 'text' for data.caption_column .*caption"):
        open_dataset(data_cfg(sources["saved"]))
    with pytest.raises(UserError, match="no column 'img' for data.image_column"):
        open_dataset(data_cfg(sources["saved"], image_column="img", caption_column="caption"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="not a readable datasets source"):
        open_dataset(data_cfg(bad, caption_column="caption"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(UserError, match=r"pip install 'ldmkit\[datasets\]'"):
        open_dataset(data_cfg(sources["saved"], caption_column="caption"))


def test_latent_cache_of_a_datasets_source_equals_the_folders(sources, tmp_path):
    from helpers.data import FakeEncoders

    def first(path, name):
        cfg = data_cfg(path, caption_column="caption", cache=True, random_flip=True)
        loader = build_loader(cfg, batch_size=4, seed=1, encoders=FakeEncoders(), cache_root=tmp_path / name)
        return next(loader)

    a, b = first(sources["folder"], "f"), first(sources["parquet"], "p")
    assert a["captions"] == b["captions"]
    assert torch.equal(a["latent_moments"], b["latent_moments"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])
