"""MS-COCO feature layout: ``prepare features`` writes it, FeatureDataset reads it back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ldmkit.config import DataConfig
from ldmkit.data.features import FeatureDataset
from ldmkit.data.folder import FolderDataset
from ldmkit.data.transforms import Draws, ImageTransform
from ldmkit.errors import UserError

from helpers.uvit import RESOLUTION, features_dir, pinned_threads, run_prepare, shapes_dir  # noqa: F401


@pytest.fixture(scope="module")
def encoders(tiny_sd15):
    from ldmkit.config import ModelConfig
    from ldmkit.families import load_family

    return load_family(ModelConfig(pretrained=str(tiny_sd15)))


def test_layout_and_read_back(features_dir, shapes_dir, encoders):
    source = FolderDataset(shapes_dir, DataConfig(path=str(shapes_dir), resolution=RESOLUTION))
    ds = FeatureDataset(features_dir)
    assert len(ds) == len(source) == 16
    assert ds.num_contexts == [len(source.load(i).captions) for i in range(16)]
    assert json.loads((features_dir / "meta.json").read_text())["resolution"] == RESOLUTION

    empty = np.load(features_dir / "empty_context.npy")
    np.testing.assert_allclose(empty, encoders.encode_prompts([""])["prompt_embeds"][0].numpy(), atol=1e-6)

    transform = ImageTransform(RESOLUTION, center_crop=True, interpolation="lanczos")  # the default, as U-ViT
    for i in (0, 5, 14):
        raw = source.load(i)
        pixels = transform(raw.image, Draws.from_seed(0)).pixel_values[None]
        np.testing.assert_allclose(
            np.load(features_dir / "train" / f"{i}.npy"), encoders.encode_images(pixels)[0].numpy(), atol=1e-5
        )
        for seed in range(6):
            item = ds[(i, seed)]
            assert item["key"] == str(i) and item["seed"] == seed
            assert item["latent_moments"].shape == (8, RESOLUTION // 8, RESOLUTION // 8)
            assert item["captions"] in raw.captions
            k = raw.captions.index(item["captions"])
            np.testing.assert_array_equal(
                item["prompt_embeds"].numpy(), np.load(features_dir / "train" / f"{i}_{k}.npy")
            )
            ref = encoders.encode_prompts([item["captions"]])["prompt_embeds"][0]
            torch.testing.assert_close(item["prompt_embeds"], ref, atol=1e-5, rtol=1e-5)
            assert item["original_size"].tolist() == [RESOLUTION, RESOLUTION]


def test_prepare_is_resumable(features_dir, tiny_sd15, shapes_dir, tmp_path, capsys):
    out = tmp_path / "feat"
    shutil.copytree(features_dir, out)
    before = {p.name: p.read_bytes() for p in (out / "train").glob("*.npy")}
    (out / "train" / "3.npy").unlink()
    (out / "train" / "7.npy").unlink()
    run_prepare(tiny_sd15, shapes_dir, out)
    assert "2 written, 14 already there" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in (out / "train").glob("*.npy")}
    assert after == before
    assert len(FeatureDataset(out)) == 16
    with pytest.raises(UserError, match="resolution"):
        run_prepare(tiny_sd15, shapes_dir, out, "--resolution", "64")


def test_caption_choice_and_dropout_follow_the_seed(features_dir):
    ds = FeatureDataset(features_dir, proportion_empty_prompts=0.25)
    i = 2  # three captions
    assert ds.num_contexts[i] == 3
    items = [ds[(i, s)] for s in range(400)]
    assert all(
        torch.equal(a["prompt_embeds"], b["prompt_embeds"]) for a, b in zip(items[:5], [ds[(i, s)] for s in range(5)])
    )
    dropped = [it for it in items if it["captions"] == ""]
    assert 0.17 < len(dropped) / len(items) < 0.33
    assert all(torch.equal(it["prompt_embeds"], ds.empty_context) for it in dropped)
    kept = {it["captions"] for it in items if it["captions"]}
    assert len(kept) == 3


def test_published_layout_without_our_extras(tmp_path):
    """The published coco256_features have no captions file and no meta.json."""
    root = tmp_path / "coco256_features"
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(root / "empty_context.npy", rng.standard_normal((77, 16)).astype(np.float32))
    for i in range(3):
        np.save(root / "train" / f"{i}.npy", rng.standard_normal((8, 32, 32)).astype(np.float32))
        for k in range(5):
            np.save(root / "train" / f"{i}_{k}.npy", rng.standard_normal((77, 16)).astype(np.float32))
    ds = FeatureDataset(root, proportion_empty_prompts=0.0)
    assert len(ds) == 3 and ds.num_contexts == [5, 5, 5]
    item = ds[(1, 123)]
    assert item["captions"] == "" and item["original_size"].tolist() == [256, 256]
    assert any(np.array_equal(item["prompt_embeds"].numpy(), np.load(root / "train" / f"1_{k}.npy")) for k in range(5))

    from ldmkit.data.loader import build_loader

    loader = build_loader(DataConfig(path=str(root), num_workers=0), batch_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["latent_moments"].shape == (2, 8, 32, 32) and batch["prompt_embeds"].shape == (2, 77, 16)

    (root / "train" / "1_4.npy").unlink()  # K may differ between samples
    assert FeatureDataset(root).num_contexts == [5, 4, 5]
    (root / "train" / "1_0.npy").unlink()
    with pytest.raises(UserError, match="sample 1 has contexts"):
        FeatureDataset(root)
    for k in range(1, 4):
        (root / "train" / f"1_{k}.npy").unlink()
    with pytest.raises(UserError, match="sample 1"):
        FeatureDataset(root)
    with pytest.raises(UserError, match="'val'"):
        FeatureDataset(root, split="val")
