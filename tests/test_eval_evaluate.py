"""``ldmkit evaluate`` end to end on the tiny SD1.5 pipeline (fixtures tiny_sd15, shapes_folder in conftest.py)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.commands import evaluate as evaluate_cmd
from ldmkit.data import synth
from ldmkit.errors import UserError
from ldmkit.eval import evaluate
from ldmkit.inference import generate_images


@pytest.fixture(scope="module")
def ddim_pipe(tiny_sd15):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_evaluate_pipeline_counts_and_quality(ddim_pipe, shapes_folder):
    prompts = synth.heldout_prompts(4, seed=0)
    reference = [Image.open(p).convert("RGB") for p in sorted(shapes_folder.glob("*.png"))]
    m = evaluate.evaluate_pipeline(
        ddim_pipe, prompts, [1, 2], guidance=7.5, seed=3, batch_size=3, reference=reference, kid_subsets=5, warmup=False
    )
    assert [s["steps"] for s in m["settings"]] == [1, 2]
    assert m["shapes_prompts"] and m["feature_net"] == "random-conv-v1-seed0" and m["reference_images"] == 32
    assert m["scheduler"] == "DDIMScheduler" and m["guidance"] == 7.5
    for s in m["settings"]:
        # CFG runs as one doubled batch: 2 rows per step per image, one UNet call per step per pipeline call.
        assert s["unet_evals_per_image"] == 2 * s["steps"]
        assert s["unet_calls_per_batch"] == s["steps"]
        assert s["images"] == 4 and s["seconds_per_image"] == pytest.approx(1 / s["images_per_second"])
        assert set(s["adherence"]) == {"color", "shape", "size", "position", "all"}
        assert s["fd"] > 0 and s["kid"] is not None and s["kid_std"] >= 0 and s["clip_score"] is None
    # Without CFG (guidance 1): one evaluation per step; same seeds -> the same images and numbers.
    m1 = evaluate.evaluate_pipeline(
        ddim_pipe, prompts[:2], [2], guidance=1.0, seed=3, reference=reference[:8], warmup=False
    )
    m2 = evaluate.evaluate_pipeline(
        ddim_pipe, prompts[:2], [2], guidance=1.0, seed=3, reference=reference[:8], warmup=False
    )
    assert m1["settings"][0]["unet_evals_per_image"] == 2
    assert m1["settings"][0]["fd"] == m2["settings"][0]["fd"]


def test_images_do_not_depend_on_batch_size(ddim_pipe):
    prompts = ["a", "b", "c"]
    one = generate_images(ddim_pipe, prompts, 2, 1.0, seed=5, batch_size=1)
    with evaluate.EvalCounter(ddim_pipe.unet) as counter:
        three = generate_images(ddim_pipe, prompts, 2, 1.0, seed=5, batch_size=3)
    assert counter.calls == 2  # one pipeline call: 2 steps, no CFG at guidance 1
    for a, b in zip(one, three):
        # Same noise per image; a batch of 3 may block its float kernels (and split them over threads)
        # differently from a batch of 1: within 2 of 255 levels, as test_generate.py allows.
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2


def _run(args: list[str]) -> int:
    parser = argparse.ArgumentParser()
    evaluate_cmd.add_arguments(parser)
    return evaluate_cmd.run(parser.parse_args(args))


def test_command_with_data(tiny_sd15, shapes_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        _run(
            [
                "--model",
                str(tiny_sd15),
                "--data",
                str(shapes_folder),
                "--steps",
                "1,2",
                "--num-images",
                "3",
                "--scheduler",
                "lcm",
                "--guidance",
                "1.0",
                "--max-reference",
                "16",
                "--device",
                "cpu",
                "--save-images",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["scheduler"] == "LCMScheduler" and m["num_images"] == 3 and m["reference_images"] == 16
    assert m["model"] == str(tiny_sd15) and m["device"] == "cpu" and m["dtype"] == "float32"
    for s in m["settings"]:
        assert s["unet_evals_per_image"] == s["steps"]  # LCM sampling at guidance 1: no CFG
        assert set(s) >= {"images_per_second", "seconds_per_image", "unet_calls_per_batch", "adherence", "fd", "kid"}
        assert s["adherence"] is not None and s["fd"] is not None
        with Image.open(out / f"grid-steps-{s['steps']}.png") as g:
            assert g.size == (4 * 64, 64)  # 3 images of 64 px in a 4-column grid
        assert len(list((out / f"steps-{s['steps']}").glob("*.png"))) == 3
    with Image.open(out / "quality_vs_steps.png") as plot:
        assert plot.width > 400 and plot.height > 250
    printed = capsys.readouterr().out
    assert "adherence" in printed and "metrics.json" in printed


def test_command_with_prompt_file(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red car\n")
    ref = tmp_path / "ref"
    synth.write_dataset(ref, num=4, size=32)
    out = tmp_path / "eval"
    assert (
        _run(
            [
                "--model",
                str(tiny_sd15),
                "--prompts",
                str(prompts),
                "--steps",
                "1",
                "--reference",
                str(ref),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = json.loads((out / "metrics.json").read_text())["settings"][0]
    assert s["adherence"] is None and s["fd"] is not None and s["images"] == 2


def test_errors(tiny_sd15, tmp_path):
    for bad in ("1,x", "0,2", ""):
        with pytest.raises(UserError, match="--steps"):
            evaluate.parse_steps(bad)
    with pytest.raises(UserError, match="model_index.json"):
        _run(["--model", str(tmp_path), "--shapes", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--prompts file not found"):
        _run(["--model", str(tiny_sd15), "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--reference not found"):
        evaluate.read_images(tmp_path / "nowhere", 10)
    with pytest.raises(SystemExit):  # --prompts, --data and --shapes are exclusive
        _run(["--model", str(tiny_sd15), "--shapes", "--data", str(tmp_path), "--out", str(tmp_path / "o")])


def test_uvit_pipeline(ddim_pipe):
    """The quickstart's pipeline: U-ViT denoiser (``pipe.unet``), CFG batched; an LCM U-ViT takes w as an embedding."""
    from ldmkit.models.uvit import UViT
    from ldmkit.pipelines.uvit import UViTPipeline

    def build(**kw):
        unet = UViT.from_preset("uvit-tiny", sample_size=8, in_channels=4, context_dim=32, **kw)
        pipe = UViTPipeline(
            vae=ddim_pipe.vae,
            text_encoder=ddim_pipe.text_encoder,
            tokenizer=ddim_pipe.tokenizer,
            unet=unet,
            scheduler=ddim_pipe.scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    prompts = synth.heldout_prompts(2)
    m = evaluate.evaluate_pipeline(build(), prompts, [1, 3], guidance=3.0, warmup=False)
    assert [s["unet_evals_per_image"] for s in m["settings"]] == [2, 6]
    assert m["settings"][0]["adherence"] is not None
    m = evaluate.evaluate_pipeline(build(time_cond_proj_dim=16), prompts, [2], guidance=8.0, warmup=False)
    assert m["settings"][0]["unet_evals_per_image"] == 2 and m["guidance"] == 8.0


@pytest.fixture(scope="module")
def caption_blind_sd15(tiny_sd15, tmp_path_factory):
    """The tiny SD1.5 with every cross-attention key and value projection zeroed: attention over the text is
    uniform over zero values, so the UNet's output does not depend on the caption at all (bit for bit)."""
    import shutil

    from diffusers import UNet2DConditionModel

    out = tmp_path_factory.mktemp("blind") / "sd15"
    shutil.copytree(tiny_sd15, out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name:
                p.zero_()
    unet.save_pretrained(out / "unet")
    return out


@pytest.fixture(scope="module")
def glyph_folders(tmp_path_factory):
    """Labelled data (10 labels, >= 10 images each) and a held-out set of the same labels."""
    root = tmp_path_factory.mktemp("glyphs")
    synth.write_dataset(root / "data", num=200, size=32, seed=0, kind="glyphs")
    synth.write_dataset(root / "heldout", num=200, size=32, seed=1, kind="glyphs")
    return root / "data", root / "heldout"


def test_command_caption_adherence_warns_on_a_caption_blind_model(caption_blind_sd15, glyph_folders, tmp_path, capsys):
    from ldmkit.eval.adherence import SEEDS

    data, _ = glyph_folders
    out = tmp_path / "eval"
    args = ["--model", str(caption_blind_sd15), "--data", str(data), "--steps", "1,2,8", "--num-images", "10"]
    args += ["--scheduler", "lcm", "--guidance", "1.0", "--teacher-solvers", "ddim", "--teacher-guidance", "1.0"]
    assert _run([*args, "--device", "cpu", "--out", str(out)]) == 0
    adh = json.loads((out / "metrics.json").read_text())["caption_adherence"]
    assert len(adh["prompts"]) == 8 and adh["seeds"] == SEEDS and len(adh["labels"]) == 10 and adh["chance"] == 0.1
    assert adh["classifier_trained_on"] == "--data" and not adh["classifier_held_out"]
    assert adh["classifier_train_images"] == 150 and 0 <= adh["classifier_real_accuracy"] <= 1
    # The evaluated model at its few-step count (the largest <= 4), the teacher once at its largest count.
    assert {n: e["steps"] for n, e in adh["models"].items()} == {"LCMScheduler": 2, "teacher ddim": 8}
    for e in adh["models"].values():
        keys = {"steps", "guidance", "caption_distance", "seed_distance", "sensitivity", "label_accuracy", "warning"}
        assert set(e) == keys
        # No CFG at guidance 1, so every caption gives the very same image at a fixed seed.
        assert e["caption_distance"] == 0.0 and e["sensitivity"] == 0.0 and e["seed_distance"] > 0
        assert e["warning"]
    printed = capsys.readouterr().out
    assert "caption adherence (8 prompts x 4 seeds" in printed and "label accuracy" in printed
    assert "which the model may have been trained on" in printed
    assert "WARNING LCMScheduler: " in printed and "WARNING teacher ddim: " in printed


def test_command_caption_adherence_options(caption_blind_sd15, glyph_folders, shapes_folder, tmp_path, capsys):
    data, heldout = glyph_folders
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    base = ["--model", str(caption_blind_sd15), "--steps", "1", "--num-images", "10", "--device", "cpu"]
    # One prompt: nothing to compare, said and stored as null; with --heldout labels the labels are the prompts.
    assert _run([*base, "--prompts", str(prompts), "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["caption_adherence"] is None
    assert "caption adherence: skipped (fewer than 2 distinct prompts)" in capsys.readouterr().out
    assert _run([*base, "--prompts", str(prompts), "--heldout", str(heldout), "--out", str(tmp_path / "h")]) == 0
    adh = json.loads((tmp_path / "h" / "metrics.json").read_text())["caption_adherence"]
    assert adh["classifier_held_out"] and adh["classifier_trained_on"] == "--heldout" and len(adh["prompts"]) == 8
    assert "label_accuracy" in next(iter(adh["models"].values()))
    # Files grouped by label (as class folders or sorted names are): the classifier's split still holds every
    # label, so it judges real images well above chance (unshuffled, its test quarter would hold labels it
    # never saw: accuracy 0).
    grouped = tmp_path / "grouped"
    grouped.mkdir()
    for i, txt in enumerate(sorted(data.glob("*.txt"))):
        caption = txt.read_text().strip()
        stem = f"{caption[-1]}-{i:03d}"
        (grouped / f"{stem}.txt").write_text(caption + "\n")
        (grouped / f"{stem}.png").write_bytes(txt.with_suffix(".png").read_bytes())
    assert _run([*base, "--data", str(grouped), "--out", str(tmp_path / "g")]) == 0
    adh = json.loads((tmp_path / "g" / "metrics.json").read_text())["caption_adherence"]
    assert not adh["classifier_held_out"] and adh["classifier_real_accuracy"] > 0.3
    assert _run([*base, "--data", str(data), "--no-caption-adherence", "--out", str(tmp_path / "no")]) == 0
    assert json.loads((tmp_path / "no" / "metrics.json").read_text())["caption_adherence"] is None
    assert "caption adherence: skipped (--no-caption-adherence)" in capsys.readouterr().out
    # Bad --heldout: one line each (UserError), before any model is loaded.
    with pytest.raises(UserError, match="--heldout not found"):
        _run([*base, "--data", str(data), "--heldout", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="not labels"):  # shapes captions: nearly one per image
        _run([*base, "--data", str(data), "--heldout", str(shapes_folder), "--out", str(tmp_path / "x")])
    other = tmp_path / "other"
    synth.write_dataset(other, num=40, size=32, seed=2, kind="glyphs")
    (other / "metadata.jsonl").unlink()
    for i, txt in enumerate(sorted(other.glob("*.txt"))):
        txt.write_text(f"label {i % 2}\n")
    with pytest.raises(UserError, match="differ from those of --data"):
        _run([*base, "--data", str(data), "--heldout", str(other), "--out", str(tmp_path / "x")])
