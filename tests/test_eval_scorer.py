"""The shapes scorer reads colour, shape, size and position back from rendered images."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldmkit.data import synth
from ldmkit.errors import UserError
from ldmkit.eval.scorer import adherence, detect, score


@pytest.mark.parametrize("size,n", [(32, 300), (64, 200)])
def test_ground_truth_accuracy(size, n):
    rng = random.Random(size)
    attrs = [synth.sample_attrs(rng) for _ in range(n)]
    images = [synth.render(a, size) for a in attrs]
    acc = adherence(images, [synth.caption(a) for a in attrs])
    assert all(acc[k] >= 0.98 for k in ("color", "shape", "size", "position", "all")), acc


def test_blurred_noisy_images_still_read():
    """Generated samples are soft and noisy: Gaussian blur of 1 px at 32 px plus noise of std 0.03."""
    rng, noise = random.Random(7), np.random.default_rng(0)
    attrs = [synth.sample_attrs(rng) for _ in range(120)]
    images = []
    for a in attrs:
        x = np.asarray(synth.render(a, 32).filter(ImageFilter.GaussianBlur(1.0))) / 255.0
        images.append(np.clip(x + noise.normal(0, 0.03, x.shape), 0, 1))
    acc = adherence(images, attrs)
    assert acc["all"] >= 0.95, acc


def test_each_wrong_attribute_is_caught():
    rng = random.Random(3)
    for _ in range(20):
        a = synth.sample_attrs(rng)
        image = synth.render(a, 32)
        assert score(image, synth.caption(a)) == dict.fromkeys(("color", "shape", "size", "position", "all"), True)
        for key, vocab in synth.ATTRIBUTES.items():
            wrong = {**a, key: next(v for v in vocab if v != a[key])}
            s = score(image, wrong)
            assert not s[key] and not s["all"]
            assert all(s[k] for k in synth.ATTRIBUTES if k != key)


def test_no_shape_scores_nothing():
    blank = Image.new("RGB", (32, 32))
    assert detect(blank) is None
    assert not any(score(blank, "a small red circle in the center").values())
    # A uniformly coloured image has no foreground either (the background is estimated from the border).
    assert detect(Image.new("RGB", (32, 32), (200, 30, 30))) is None


def test_background_colour_need_not_be_black():
    a = {"color": "blue", "shape": "triangle", "size": "large", "position": "bottom right"}
    x = np.asarray(synth.render(a, 32)).astype(float)
    grey = np.where(x.sum(-1, keepdims=True) == 0, 60.0, x)
    assert score(grey.astype(np.uint8), a)["all"]


def test_errors():
    image = synth.render({"color": "red", "shape": "circle", "size": "small", "position": "center"}, 32)
    with pytest.raises(UserError, match="not a shapes caption"):
        score(image, "a photo of a cat")
    with pytest.raises(UserError, match="as many images as prompts"):
        adherence([image], [])
