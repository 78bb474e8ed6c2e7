"""Synthetic shapes data: rendering, captions, held-out prompts, folder and WebDataset outputs."""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import synth
from ldmkit.errors import UserError


def test_caption_round_trip_every_combination():
    combos = synth.all_attrs()
    assert len(combos) == math.prod(len(v) for v in synth.ATTRIBUTES.values()) == 120
    captions = {synth.caption(a) for a in combos}
    assert len(captions) == len(combos)  # captions are unique
    for a in combos:
        assert synth.parse_caption(synth.caption(a)) == a
    assert (
        synth.caption({"color": "red", "shape": "circle", "size": "small", "position": "top left"})
        == "a small red circle in the top left"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "a small red blue circle in the center",
        "a small red circle",
        "a large green square in the top left and the center",
    ],
)
def test_parse_caption_rejects_non_shapes_text(text):
    assert synth.parse_caption(text) is None


def test_parse_caption_accepts_paraphrase():
    assert synth.parse_caption("Top right: a LARGE yellow triangle") == {
        "color": "yellow",
        "shape": "triangle",
        "size": "large",
        "position": "top right",
    }
    assert synth.parse_caption("a small blue square in the centre")["position"] == "center"


def test_render_geometry_and_colour():
    attrs = {"color": "green", "shape": "square", "size": "large", "position": "center"}
    img = np.asarray(synth.render(attrs, 64)).astype(float)
    assert img.shape == (64, 64, 3)
    assert tuple(img[32, 32]) == synth.PALETTE["green"]
    assert tuple(img[0, 0]) == synth.BACKGROUND
    r = synth.RADII["large"] * 64
    areas = {"circle": math.pi * r * r, "square": 4 * r * r, "triangle": 2 * r * r}
    for shape, area in areas.items():
        cover = np.asarray(synth.render({**attrs, "shape": shape}, 64))[..., 1] / synth.PALETTE["green"][1]
        assert cover.sum() == pytest.approx(area, rel=0.01)
    # Position: the top-left shape's mass is in the top-left quadrant.
    tl = np.asarray(synth.render({**attrs, "position": "top left", "size": "small"}, 64)).sum(-1)
    assert tl[:32, :32].sum() == tl.sum() > 0


def test_sample_attrs_stays_inside_the_image():
    rng = random.Random(0)
    for _ in range(300):
        a = synth.sample_attrs(rng)
        cx, cy = synth.POSITIONS[a["position"]]
        r = synth.RADII[a["size"]] * a["scale"]
        assert 0 < cx + a["dx"] - r and cx + a["dx"] + r < 1 and 0 < cy + a["dy"] - r and cy + a["dy"] + r < 1


def test_heldout_prompts_balanced_and_seeded():
    p = synth.heldout_prompts(240, seed=3)
    assert collections.Counter(p) == collections.Counter({synth.caption(a): 2 for a in synth.all_attrs()})
    assert synth.heldout_prompts(240, seed=3) == p
    assert synth.heldout_prompts(240, seed=4) != p
    assert synth.heldout_prompts(7, seed=3) == p[:7]
    with pytest.raises(UserError):
        synth.heldout_prompts(0)


def test_folder_output(tmp_path):
    out = tmp_path / "shapes"
    synth.write_dataset(out, num=12, fmt="folder", size=32, seed=5)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len(list(out.glob("*.png"))) == 12 and len(list(out.glob("*.txt"))) == 12
    for row in rows:
        assert (out / row["file_name"]).exists()
        assert (out / row["file_name"]).with_suffix(".txt").read_text().strip() == row["text"]
        assert synth.parse_caption(row["text"]) == {k: row[k] for k in synth.ATTRIBUTES}
        with Image.open(out / row["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), np.asarray(synth.render(row, 32)))
    # Sample i depends only on (seed, i): a longer dataset starts with the same samples.
    out2 = tmp_path / "more"
    synth.write_dataset(out2, num=20, fmt="folder", size=32, seed=5)
    assert (out2 / "00011.png").read_bytes() == (out / "00011.png").read_bytes()
    assert (out2 / "metadata.jsonl").read_text().splitlines()[:12] == (out / "metadata.jsonl").read_text().splitlines()


def test_wds_output(tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    shards = synth.write_dataset(out, num=10, fmt="wds", size=32, seed=1, shard_size=4)
    assert [s.name for s in shards] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert names == [f"0000{i}.{ext}" for i in range(4) for ext in ("json", "png", "txt")]
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"{i:05d}" for i in range(10)]
    for s in samples:
        assert s["png"].size == (32, 32)
        assert synth.parse_caption(s["txt"]) == {k: s["json"][k] for k in synth.ATTRIBUTES}
        assert s["json"]["text"] == s["txt"] and s["json"]["width"] == 32
    # Byte-reproducible shards (fixed tar mtimes).
    again = synth.write_dataset(tmp_path / "wds2", num=10, fmt="wds", size=32, seed=1, shard_size=4)
    assert again[1].read_bytes() == shards[1].read_bytes()


def test_command_and_errors(tmp_path, capsys):
    from ldmkit.commands import data_synth

    parser = argparse.ArgumentParser()
    data_synth.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "d"), "--num", "3", "--size", "24", "--format", "wds"])
    assert data_synth.run(args) == 0
    assert "wrote 3 shapes samples" in capsys.readouterr().out
    assert (tmp_path / "d" / "shapes-000000.tar").exists()
    assert data_synth.run(args) == 0  # its own earlier output (the marker says so) is written again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    args.out = str(tmp_path / "mine")
    with pytest.raises(UserError, match="was not written by ldmkit data synth: pass --overwrite"):
        data_synth.run(args)
    with pytest.raises(UserError, match="--num"):
        synth.write_dataset(tmp_path / "e", num=0)
    with pytest.raises(UserError, match="color"):
        synth.render({"color": "pink", "shape": "circle", "size": "small", "position": "center"}, 32)
