"""Captions as taggers write them: shuffle_tags, keep_tokens, tag_dropout, caption_prefix; per-sample determinism."""

from __future__ import annotations

import pytest

from ldmkit.config import Config, DataConfig, validate_config
from ldmkit.data import Draws, open_dataset
from ldmkit.data.transforms import TagCaptions
from ldmkit.errors import UserError

from helpers.data import data_cfg, make_items, write_folder

TAGS = "1girl, solo, red hair, smile, outdoors, tree, sky, dress"


def test_shuffle_keeps_the_first_tokens_and_is_fixed_by_the_seed():
    tags = TagCaptions(shuffle=True, keep_tokens=2)
    outs = {seed: tags(TAGS, seed) for seed in range(40)}
    for seed, out in outs.items():
        parts = out.split(", ")
        assert parts[:2] == ["1girl", "solo"]
        assert sorted(parts) == sorted(TAGS.split(", "))
        assert tags(TAGS, seed) == out  # the same sample seed: the same caption
    assert len({o for o in outs.values()}) > 20  # and the order does change from seed to seed
    assert TagCaptions()(TAGS, 3) == TAGS  # nothing on: the caption as written
    assert tags("", 3) == ""  # the dropped (empty) caption stays empty


def test_tag_dropout_spares_kept_tags_and_prefix_goes_first():
    tags = TagCaptions(keep_tokens=1, dropout=0.5, prefix="sks")
    lengths = []
    for seed in range(200):
        parts = tags(TAGS, seed).split(", ")
        assert parts[:2] == ["sks", "1girl"]
        rest = parts[2:]
        assert rest == [t for t in TAGS.split(", ")[1:] if t in rest]  # no shuffle: order kept
        lengths.append(len(rest))
    assert 0.4 < sum(lengths) / (200 * 7) < 0.6  # each of the 7 droppable tags goes about half of the time
    assert TagCaptions(dropout=1.0)(TAGS, 0) == ""
    assert TagCaptions(keep_tokens=3, dropout=1.0)(TAGS, 0) == "1girl, solo, red hair"


def test_tags_leave_the_other_draws_alone_and_apply_in_the_reader(tmp_path):
    items = [(k, data, ext, [TAGS]) for k, data, ext, _ in make_items(4)]
    folder = write_folder(tmp_path / "f", items)
    plain = open_dataset(data_cfg(folder, random_flip=True, center_crop=False))
    tagged = open_dataset(
        data_cfg(folder, random_flip=True, center_crop=False, shuffle_tags=True, keep_tokens=1, caption_prefix="sks")
    )
    for index, seed in [(0, 11), (1, 12), (3, 99)]:
        a, b = plain[(index, seed)], tagged[(index, seed)]
        assert (a["pixel_values"] == b["pixel_values"]).all() and a["crop_top_left"].tolist() == b[
            "crop_top_left"
        ].tolist()
        assert b["captions"] == TagCaptions(True, 1, 0.0, "sks")(TAGS, seed)
        assert b["captions"].startswith("sks, 1girl, ") and tagged[(index, seed)]["captions"] == b["captions"]
    assert Draws.from_seed(11) == Draws.from_seed(11)


@pytest.mark.parametrize(
    "data, message",
    [
        (dict(tag_dropout=1.5), "data.tag_dropout must be in"),
        (dict(keep_tokens=-1), "data.keep_tokens"),
        (dict(cache=True, shuffle_tags=True), "data.shuffle_tags changes captions per step"),
        (dict(cache=True, caption_prefix="sks"), "data.caption_prefix"),
    ],
)
def test_bad_tag_settings_are_one_line(data, message):
    with pytest.raises(UserError, match=message) as e:
        validate_config(Config(data=DataConfig(path="x", **data)))
    assert "\n" not in str(e.value)
