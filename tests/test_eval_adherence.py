"""Caption sensitivity and the label classifier (ldmkit.eval.adherence) on the glyph data, with
stand-in "models" whose behaviour is known: one that draws the prompt's label, one that ignores it; and
end to end, ``ldmkit evaluate`` on a U-ViT trained without captions."""

from __future__ import annotations

import argparse
import json
import random
from types import SimpleNamespace

import pytest

from ldmkit.data import glyphs
from ldmkit.eval.adherence import (
    MAX_PROMPTS,
    LabelClassifier,
    caption_adherence,
    caption_sensitivity,
    caption_warning,
    fit_label_classifier,
    generate_grid,
    labels_of,
    representative_steps,
    sensitivity_prompts,
)

LABELS = glyphs.LABELS


def follows(prompt: str, n: int, seed: int):
    """Draws the prompt's letter; the seed picks style, size, position."""
    out = []
    for j in range(n):
        attrs = glyphs.sample_attrs(random.Random(seed + j))
        attrs["label"] = glyphs.label_of(prompt) or prompt  # a caption, or a bare label (the classifier's classes)
        out.append(glyphs.render(attrs, 32))
    return out


def ignores(prompt: str, n: int, seed: int):
    """Draws a letter chosen by the seed alone."""
    return [glyphs.render(glyphs.sample_attrs(random.Random(seed + j)), 32) for j in range(n)]


@pytest.fixture(scope="module")
def classifier():
    train = [glyphs.make_sample(i, 32, seed=1) for i in range(600)]
    clf = LabelClassifier(LABELS, seed=0).fit([im for im, _ in train], [a["label"] for _, a in train], epochs=25)
    return clf


def test_glyph_captions_differ_in_one_word():
    caps = {glyphs.caption(glyphs.make_sample(i, 32, 0)[1]) for i in range(200)}
    assert len(caps) == len(LABELS)
    words = [c.split() for c in caps]
    assert all(w[:-1] == words[0][:-1] for w in words) and len({w[-1] for w in words}) == len(LABELS)
    assert labels_of([glyphs.caption(glyphs.make_sample(i, 32, 0)[1]) for i in range(300)]) == sorted(caps)
    assert labels_of([f"free caption {i}" for i in range(300)]) is None  # too many distinct captions


def test_sensitivity_separates_following_from_ignoring():
    prompts = glyphs.heldout_prompts(len(LABELS))
    good = caption_sensitivity(generate_grid(follows, prompts, seeds=4))
    bad = caption_sensitivity(generate_grid(ignores, prompts, seeds=4))
    assert bad["caption_distance"] == 0.0 and bad["sensitivity"] == 0.0
    assert good["sensitivity"] > 0.5 and good["seed_distance"] > 0
    assert caption_warning(bad["sensitivity"]) is not None and caption_warning(good["sensitivity"]) is None


def test_label_classifier_judges_samples(classifier):
    real = [glyphs.make_sample(i, 32, seed=2) for i in range(200)]  # held out from the classifier's data
    real_acc = classifier.accuracy([im for im, _ in real], [a["label"] for _, a in real])
    assert real_acc > 0.8
    prompts = glyphs.heldout_prompts(100)
    labels = [glyphs.label_of(p) for p in prompts]
    good = classifier.accuracy([follows(p, 1, 1000 + i)[0] for i, p in enumerate(prompts)], labels)
    bad = classifier.accuracy([ignores(p, 1, 1000 + i)[0] for i, p in enumerate(prompts)], labels)
    assert good > 0.7 and bad < 0.3
    chance = 1 / len(LABELS)
    assert caption_warning(1.0, bad, chance) is not None and caption_warning(1.0, good, chance) is None


class StandIn:
    """Pipeline-shaped: ``generate_images`` calls it as a diffusers pipeline; image k comes from
    ``draw(prompt, 1, seed of generator k)``, so the seed rule is the real one."""

    def __init__(self, draw):
        self.draw = draw
        self.calls = []

    def __call__(self, prompt, num_inference_steps, generator, guidance_scale=7.5, num_images_per_prompt=1):
        self.calls.append((len(prompt), num_inference_steps, guidance_scale))
        rows = [p for p in prompt for _ in range(num_images_per_prompt)]
        return SimpleNamespace(images=[self.draw(p, 1, g.initial_seed())[0] for p, g in zip(rows, generator)])


def test_label_classifier_is_reproducible():
    """Its dropout draws from the global RNG: seeded by the classifier, the same whatever ran before it."""
    import torch

    samples = [glyphs.make_sample(i, 32, seed=4) for i in range(48)]
    images, labels = [im for im, _ in samples], [a["label"] for _, a in samples]
    fits = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        fits.append(LabelClassifier(LABELS, seed=0).fit(images, labels, epochs=2).net.state_dict())
        after = torch.rand(3)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(3))  # the caller's RNG is left where it was
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


def test_caption_adherence_of_a_pipeline(classifier):
    prompts = sensitivity_prompts(glyphs.heldout_prompts(200))
    assert len(prompts) == MAX_PROMPTS and prompts == sorted(set(prompts))
    pipe = StandIn(follows)
    good = caption_adherence(pipe, prompts, 4, 3.0, seed=10, classifier=classifier, samples_per_label=3)
    assert set(good) == {"caption_distance", "seed_distance", "sensitivity", "label_accuracy", "warning"}
    assert good["sensitivity"] > 0.5 and good["label_accuracy"] > 0.7 and good["warning"] is None
    # One call per prompt (its SEEDS images), then the labels' samples in batches of batch_size.
    assert pipe.calls[: len(prompts)] == [(1, 4, 3.0)] * len(prompts)
    assert sum(n for n, _, _ in pipe.calls[len(prompts) :]) == 3 * len(LABELS)
    bad = caption_adherence(StandIn(ignores), prompts, 4, 3.0, seed=10, classifier=classifier, samples_per_label=3)
    assert bad["sensitivity"] == 0.0 and bad["label_accuracy"] < 0.3 and bad["warning"]
    # Without a classifier: sensitivity alone (free-form captions).
    assert "label_accuracy" not in caption_adherence(StandIn(ignores), prompts[:2], 1, None, seed=0)
    with pytest.raises(ValueError, match="2 distinct prompts"):
        caption_adherence(pipe, prompts[:1], 4, 3.0, seed=0)


def test_prompts_steps_and_classifier_split():
    assert sensitivity_prompts(["b", "a", "b", "c"]) == ["a", "b", "c"]
    assert sensitivity_prompts([f"{i:02d}" for i in range(16)], n=4) == ["00", "04", "08", "12"]
    assert sensitivity_prompts([]) == []
    assert representative_steps([1, 2, 4, 8]) == 4 and representative_steps([2, 3]) == 3
    assert representative_steps([8, 25]) == 8
    samples = [glyphs.make_sample(i, 32, seed=3) for i in range(40)]
    images, labels = [im for im, _ in samples], [glyphs.caption(a) for _, a in samples]
    clf, real = fit_label_classifier(sorted(set(labels)), images, labels, seed=0)
    assert 0.0 <= real <= 1.0 and clf.classes == sorted(set(labels))
    with pytest.raises(ValueError, match="not labels"):
        fit_label_classifier(["a drawing of the letter A"], images, labels)


# ----------------------------------------------------------------------------------------------------
# End to end: a U-ViT trained by the real loop without ever seeing a caption, judged by `ldmkit evaluate`


def _train(recipe: str, overrides: list[str]):
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    cfg = load_config(recipe, [*overrides, "--train.validate_every=0", "--train.checkpoint_every=0"])
    return cfg, train(cfg)


@pytest.mark.slow
def test_evaluate_warns_on_a_teacher_that_never_saw_a_caption(tmp_path, capsys):
    """``method.p_uncond=1.0`` drops every caption: the loop feeds the U-ViT only the empty caption's
    embedding, so nothing it learns ties an image to its label. At sampling time the real captions'
    embeddings still reach it (through its context tokens), so the images are not exactly the same for
    every caption: what is asserted is what was measured, with margin.

    Measured here (DPM-Solver 4 steps, guidance 3): sensitivity 0.004 (caption distance 0.0012 against seed
    distance 0.29), label accuracy 0.10 with 1 thread and 0.12 with 2 (chance 0.10), from a classifier that
    reads real held-out glyphs at 0.86. Not asserted: a contrast with a conditional teacher. One of the same size
    (p_uncond 0.1, DDIM 8 steps) measured 0.005 / 0.009 / 0.017 after 250 / 500 / 1000 steps against the
    unconditional one's 0.005 / 0.010 after 250 / 500: at a size a test can train, neither has learnt to
    follow captions, so low figures here are what an unconditional model must show, not proof that only it
    shows them. The measures' separation of a model that follows from one that ignores is tested with the
    stand-ins above and test_eval_evaluate.py's caption-blind model.
    """
    import shutil

    from ldmkit.commands import evaluate as evaluate_cmd
    from ldmkit.data.synth import write_dataset
    from ldmkit.eval.adherence import MIN_SENSITIVITY
    from ldmkit.eval.evaluate import read_data
    from ldmkit.models.text import write_text_components

    data, heldout, base = tmp_path / "data", tmp_path / "heldout", tmp_path / "base"
    write_dataset(data, num=400, fmt="folder", size=32, seed=0, kind="glyphs")
    write_dataset(heldout, num=400, fmt="folder", size=32, seed=7919, kind="glyphs")
    # The quickstart's text encoder with 8 tokens ("a drawing of the letter X" + BOS / EOS) rather than 32:
    # the U-ViT's sequence is 1 + 8 + 16 tokens, and a teacher step ~1.5x faster (measured).
    write_text_components(base, read_data(data, 400)[1], hidden_size=64, num_layers=2, max_length=8, seed=0)
    common = [f"--data.path={data}", "--data.resolution=32", "--data.num_workers=0"]
    _, vae = _train(
        "vae/quickstart.yaml",
        ["--method.name=vae", *common, "--train.max_steps=60", f"--output_dir={tmp_path / 'vae'}"],
    )
    shutil.copytree(vae, base / "vae", ignore=shutil.ignore_patterns("ldmkit_config.yaml"))
    cfg, teacher = _train(
        "uvit/quickstart.yaml",
        [
            "--method.name=uvit",
            "--method.p_uncond=1.0",
            f"--model.pretrained={base}",
            *common,
            "--data.cache=true",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--train.max_steps=150",
            f"--output_dir={tmp_path / 'teacher'}",
        ],
    )
    assert cfg.data.proportion_empty_prompts == 1.0  # every caption of every batch dropped

    parser = argparse.ArgumentParser()
    evaluate_cmd.add_arguments(parser)
    out = tmp_path / "eval"
    args = ["--model", str(teacher), "--data", str(data), "--heldout", str(heldout), "--steps", "4"]
    args += ["--guidance", "3", "--num-images", "100", "--batch-size", "25", "--device", "cpu", "--out", str(out)]
    assert evaluate_cmd.run(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    adh = json.loads((out / "metrics.json").read_text())["caption_adherence"]
    (entry,) = adh["models"].values()
    assert adh["classifier_held_out"] and adh["classifier_real_accuracy"] > 0.7  # it can read real glyphs
    assert entry["caption_distance"] > 0  # the captions do reach the model ...
    assert entry["sensitivity"] < MIN_SENSITIVITY / 5  # ... but the image barely follows them
    assert entry["label_accuracy"] < 2 * adh["chance"]
    assert entry["warning"] and f"WARNING {next(iter(adh['models']))}: " in printed


def test_label_classifier_split_is_shuffled_for_grouped_data():
    """Data grouped by label (30 images of A, then 10 of B): the unshuffled 3/4 split never shows B to the
    classifier and tests on B alone; ``shuffle=True`` (user data in the quickstart, --data in evaluate) gives
    both parts both labels, so the real-image accuracy measures the classifier, not the file order."""
    from PIL import Image

    from ldmkit.eval.adherence import fit_label_classifier

    images = [Image.new("RGB", (16, 16), (220, 220, 220))] * 30 + [Image.new("RGB", (16, 16), (20, 20, 20))] * 10
    captions = ["A"] * 30 + ["B"] * 10
    _, grouped = fit_label_classifier(["A", "B"], images, captions, seed=0)
    _, shuffled = fit_label_classifier(["A", "B"], images, captions, seed=0, shuffle=True)
    assert grouped == 0.0
    assert shuffled >= 0.9
