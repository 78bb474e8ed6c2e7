"""Offline text conditioning (ldmkit.models.text): word tokenizer, frozen random CLIP text encoder, the
folder the model families / UViTPipeline load, and the caption-separation measure (ldmkit.eval.text_probe)
on the shapes captions."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from ldmkit.data.synth import ATTRIBUTES, all_attrs, caption, parse_caption
from ldmkit.errors import UserError
from ldmkit.eval.text_probe import caption_separation, embed_captions
from ldmkit.models.text import build_text_encoder, build_word_tokenizer, caption_words, write_text_components

SHAPES = [caption(a) for a in all_attrs()]  # the 120 shapes captions
UNSEEN = ["Zebra über 42 zebras!", "a small red circle, top-left", "CIRCLE circles"]
# The quickstart's sizes.
HIDDEN, LAYERS, MAX_LENGTH = 64, 2, 32
# Nearest pair of distinct captions at least a tenth of the typical (median) distance apart: far from 0
# (identical to the model; what truncation gives, see test_separation_detects_truncation) and a margin
# of 2.4x under what seeds 0-2 give (0.24, 0.34, 0.31), each time for two captions that differ in one
# word ("top left" / "top right", "bottom left" / "bottom right", "top right" / "bottom right").
MIN_RATIO = 0.1


@pytest.fixture(scope="module")
def shapes_tokenizer():
    return build_word_tokenizer(SHAPES, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return write_text_components(
        tmp_path_factory.mktemp("text") / "model",
        SHAPES,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        max_length=MAX_LENGTH,
        seed=0,
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from ldmkit.models.tiny import _vae

    out = tmp_path_factory.mktemp("vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _vae(0.18215).save_pretrained(out)
    return out


def _ids(tok, text: str) -> list[int]:
    return tok(text).input_ids


def test_shapes_words_are_single_tokens(shapes_tokenizer):
    tok = shapes_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos) == (512, 513)  # tiny.py's byte vocabulary is kept as is
    ids = _ids(tok, "a small red circle")
    assert len(ids) == 6 and ids[0] == bos and ids[-1] == eos
    assert len(_ids(tok, "a large yellow triangle in the bottom right")) == 8 + 2
    words = {w for vocab in ATTRIBUTES.values() for v in vocab for w in v.split()} | {"a", "in", "the"}
    for w in words:
        assert len(_ids(tok, w)) == 3, w
    assert len({_ids(tok, w)[1] for w in words}) == len(words)
    assert tok.model_max_length == MAX_LENGTH


def test_unseen_text_still_tokenises(shapes_tokenizer):
    tok = shapes_tokenizer
    for text in UNSEEN:
        ids = _ids(tok, text)
        assert tok.eos_token_id not in ids[1:-1]  # no unknown token (unk is <|endoftext|>)
        assert max(ids) < len(tok)
    assert tok.decode(_ids(tok, "zebra über"), skip_special_tokens=True) == "zebra über"
    assert len(_ids(tok, "circles")) > 3  # not a caption word: sub-words


def _zipf_captions() -> list[str]:
    """3000 captions of 1500 Zipf-distributed random words (shared prefixes, repeats, 1-letter words)."""
    rnd = random.Random(0)
    alphabet = "abcdeilnorst"
    vocab = list(dict.fromkeys("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))) for _ in range(1500)))
    return [" ".join(rnd.choices(vocab, weights=[1 / (k + 1) for k in range(len(vocab))], k=8)) for _ in range(3000)]


def test_every_word_of_a_larger_corpus_becomes_one_token():
    """BPE run to completion on a Zipf corpus; max_words keeps only the most frequent words whole."""
    captions = _zipf_captions()
    counts = caption_words(captions)
    tok = build_word_tokenizer(captions, max_words=100_000)
    model = tok.backend_tokenizer.model
    assert all(len(model.tokenize(w)) == 1 for w in counts)
    top = build_word_tokenizer(captions, max_words=20)
    whole = [w for w in counts if len(top.backend_tokenizer.model.tokenize(w)) == 1]
    assert {w for w, _ in counts.most_common(20)} <= set(whole) and len(whole) < 100


def test_the_same_captions_give_the_same_tokenizer():
    """Many pairs tie in count on this corpus; the trainer must break the ties the same way every time
    (the quickstart's re-run reproduces its figures)."""
    captions = _zipf_captions()
    first = build_word_tokenizer(captions).backend_tokenizer.to_str()
    for _ in range(2):
        assert build_word_tokenizer(captions).backend_tokenizer.to_str() == first


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="max_length"):
        build_word_tokenizer(SHAPES, max_length=2)
    with pytest.raises(UserError, match="divisible"):
        build_text_encoder(600, hidden_size=30, num_heads=4)


def test_saved_folder_round_trip(text_dir, shapes_tokenizer, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer

    expected = [_ids(shapes_tokenizer, t) for t in SHAPES[:5] + UNSEEN]
    loaded = [
        CLIPTokenizer.from_pretrained(text_dir / "tokenizer"),
        AutoTokenizer.from_pretrained(text_dir / "tokenizer"),
    ]
    # vocab.json + merges.txt alone (what the slow tokenizer of older transformers reads)
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(text_dir / "tokenizer" / name, slow / name)
    loaded.append(CLIPTokenizer.from_pretrained(slow))
    for tok in loaded:
        assert [_ids(tok, t) for t in SHAPES[:5] + UNSEEN] == expected
        assert tok.model_max_length == MAX_LENGTH

    encoder = CLIPTextModel.from_pretrained(text_dir / "text_encoder")
    fresh = build_text_encoder(len(shapes_tokenizer), HIDDEN, LAYERS, 4, MAX_LENGTH, seed=0)
    torch.testing.assert_close(
        embed_captions(encoder, loaded[0], SHAPES[:4]), embed_captions(fresh, shapes_tokenizer, SHAPES[:4])
    )
    assert encoder.config.eos_token_id == shapes_tokenizer.eos_token_id
    index = json.loads((text_dir / "model_index.json").read_text())
    assert set(index) >= {"text_encoder", "tokenizer", "scheduler"} and "vae" not in index


def test_encoder_is_frozen_and_deterministic_per_seed():
    state = torch.get_rng_state()
    a, b, c = (build_text_encoder(600, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.allclose(wa, wc)


def test_family_and_uvit_pipeline_load_the_folder(text_dir, vae_dir, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from ldmkit.config import ModelConfig
    from ldmkit.families import load_family
    from ldmkit.methods.uvit import training_scheduler
    from ldmkit.models.uvit import UViT
    from ldmkit.pipelines.uvit import UViTPipeline

    with pytest.raises(UserError, match="VAE config"):  # a family always reads a VAE config
        load_family(ModelConfig(pretrained=str(text_dir)))
    models = load_family(ModelConfig(pretrained=str(text_dir), vae=str(vae_dir)))
    embeds = models.encode_prompts(SHAPES[:3])["prompt_embeds"]
    assert embeds.shape == (3, MAX_LENGTH, HIDDEN)

    # A VAE inside the folder works too, and the written model_index.json then lists it.
    inside = tmp_path / "model"
    shutil.copytree(vae_dir, inside / "vae")
    write_text_components(inside, SHAPES, hidden_size=HIDDEN, num_layers=LAYERS, max_length=MAX_LENGTH, seed=0)
    assert "vae" in json.loads((inside / "model_index.json").read_text())
    models2 = load_family(ModelConfig(pretrained=str(inside)))
    torch.testing.assert_close(models2.encode_prompts(SHAPES[:3])["prompt_embeds"], embeds)

    unet = UViT.from_preset("uvit-tiny", sample_size=4, context_dim=HIDDEN, num_text_tokens=MAX_LENGTH)
    pipe = UViTPipeline(
        vae=models.vae,
        text_encoder=models.text_encoders[0],
        tokenizer=models.tokenizers[0],
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(training_scheduler("epsilon").config),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    again = UViTPipeline.from_pretrained(tmp_path / "pipe")
    torch.testing.assert_close(again.encode_prompt(SHAPES[:3], torch.device("cpu")), embeds)


def test_separation_on_the_shapes_captions(shapes_tokenizer):
    """The quickstart's frozen encoder (hidden 64, 2 layers, 32 tokens) tells all 120 captions apart and
    every attribute is linearly readable, for two seeds."""
    attrs = {c: parse_caption(c) for c in SHAPES}
    for seed in (0, 1):
        encoder = build_text_encoder(len(shapes_tokenizer), HIDDEN, LAYERS, 4, MAX_LENGTH, seed=seed)
        r = caption_separation(encoder, shapes_tokenizer, SHAPES + SHAPES[:3] + [""], attrs)  # counted once; "" apart
        assert r["num_captions"] == 120 and r["truncated_fraction"] == 0
        assert r["min_to_median_distance"] > MIN_RATIO, r
        assert r["empty_to_median_distance"] > MIN_RATIO, r
        for key in ("color", "shape", "size", "position"):
            assert r[f"probe_{key}"] >= 0.95, r


def test_separation_detects_truncation_and_the_probe_does_not_overfit(shapes_tokenizer):
    from ldmkit.models.tiny import byte_tokenizer

    # One token per character cut at 32 tokens: "... top left" and "... top right" become identical.
    chars = byte_tokenizer()
    chars.model_max_length = MAX_LENGTH
    encoder = build_text_encoder(len(chars), HIDDEN, LAYERS, 4, MAX_LENGTH)
    attrs = {c: parse_caption(c) for c in SHAPES}
    r = caption_separation(encoder, chars, SHAPES, attrs)
    assert r["min_to_median_distance"] < 1e-6 and r["truncated_fraction"] == 0.5 and r["probe_position"] < 0.95

    # Labels unrelated to the captions: leave-one-out accuracy near chance, though 2048 features > 120 rows.
    shuffled = list(attrs.values())
    random.Random(0).shuffle(shuffled)
    encoder = build_text_encoder(len(shapes_tokenizer), HIDDEN, LAYERS, 4, MAX_LENGTH)
    r = caption_separation(encoder, shapes_tokenizer, SHAPES, dict(zip(SHAPES, shuffled)))
    assert r["probe_color"] < 0.5 and r["probe_position"] < 0.4

    with pytest.raises(UserError, match="2 distinct"):
        caption_separation(encoder, shapes_tokenizer, ["a", "a"])
