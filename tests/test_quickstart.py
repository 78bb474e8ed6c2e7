"""``ldmkit quickstart``: ``--quick`` end to end (every stage runs, the report is complete and valid), each
``--method`` at a tiny size, and the plan that follows the data and ``--minutes`` (``plan_for``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from helpers.quickstart import run_quickstart, tiny_plan

STAGES = ("data", "base", "vae", "teacher", "distilled")
SETTINGS = ("teacher_50", "teacher_4", "lcm_1", "lcm_2", "lcm_4")


@pytest.mark.slow
def test_quickstart_quick_writes_a_valid_report(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [sys.executable, "-m", "ldmkit", "quickstart", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for stage in STAGES:
        assert Path(report["exports"][stage]).exists(), stage
    figs = report["figures"]
    for name in SETTINGS:
        f = figs[name]
        assert 0.0 <= f["adherence"] <= 1.0 and f["seconds_per_image"] > 0
        assert set(f["adherence_per_attribute"]) >= {"color", "shape", "size", "position", "all"}
    # UNet evaluations per image: guided DDIM runs cond+uncond per step; the LCM one pass per step.
    assert figs["teacher_50"]["unet_evals_per_image"] == 100 and figs["lcm_4"]["unet_evals_per_image"] == 4
    assert figs["teacher_4"]["rms_to_teacher_50"] > 0
    html = (out / "report.html").read_text()
    assert "grids.png" in html and "quality.png" in html
    assert (out / "grids.png").stat().st_size > 0 and (out / "quality.png").stat().st_size > 0
    assert report["text_separation"]["probe_color"] >= 0.9


def test_quickstart_on_user_data_with_lcd_and_a_rerun_that_skips_every_stage(tmp_path, monkeypatch, capsys):
    """``--data`` takes the user's own image-caption folder (captions that are not shapes captions, so no
    adherence, but FD/KID to the data and speed), and ``--lcd`` distills a full LCD student (tiny plan,
    in-process). Re-running the same command skips every finished stage: no stage trains again and the
    figures come back the same."""
    import numpy as np

    from ldmkit.quickstart import stages
    from ldmkit.train import loop

    data = tmp_path / "mine"
    data.mkdir()
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "blue": (50, 90, 230), "green": (40, 190, 60)}
    for i in range(48):  # vertical or horizontal two-colour gradients, captioned by their colours and direction
        (a, ca), (b, cb) = [list(colours.items())[j] for j in rng.choice(3, size=2, replace=False)]
        t = np.linspace(0, 1, 40)[:, None, None]
        grad = (1 - t) * np.array(ca) + t * np.array(cb)  # (40, 1, 3)
        vertical = i % 2 == 0
        img = np.broadcast_to(grad if vertical else grad.transpose(1, 0, 2), (40, 40, 3))
        Image.fromarray(img.astype(np.uint8)).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(f"a {'vertical' if vertical else 'horizontal'} gradient from {a} to {b}\n")

    monkeypatch.setattr(stages, "plan_for", lambda *a, **k: (tiny_plan(), "A tiny plan for a test."))
    out = tmp_path / "qs"
    assert run_quickstart(["--lcd", "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "lcd" and Path(report["exports"]["data"]) == data
    assert not (out / "data").exists()  # the user's data is used in place, not copied or synthesised
    for stage in STAGES:
        assert Path(report["exports"][stage]).exists(), stage
    assert (Path(report["exports"]["distilled"]) / "unet" / "config.json").is_file()  # full LCD: a whole pipeline
    figs = report["figures"]
    for name in SETTINGS:
        assert figs[name]["adherence"] is None  # not shapes captions: nothing to score
        assert figs[name]["fd"] is not None and figs[name]["fd"] >= 0 and figs[name]["seconds_per_image"] > 0
    # Full LCD takes w through its embedding: one UNet pass per step, no CFG pair.
    assert figs["lcm_4"]["unet_evals_per_image"] == 4 and figs["teacher_4"]["unet_evals_per_image"] == 8
    assert "report" in capsys.readouterr().out

    # Re-running skips every finished stage (no training step runs) and rewrites the same figures.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    exported = {stage: Path(report["exports"][stage]) for stage in ("vae", "teacher", "distilled")}
    mtimes = {stage: max(f.stat().st_mtime_ns for f in path.rglob("*")) for stage, path in exported.items()}
    monkeypatch.setattr(loop, "make_accelerator", no_training)  # what a stage that trains builds first
    assert run_quickstart(["--lcd", "--data", str(data), "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    for name in SETTINGS:
        assert again["figures"][name]["fd"] == figs[name]["fd"]
    assert {stage: max(f.stat().st_mtime_ns for f in path.rglob("*")) for stage, path in exported.items()} == mtimes


def test_shapes_data_passed_with_data_is_recognised(shapes_folder, tmp_path):
    """``--data`` pointing at ``ldmkit data synth`` output is scored for adherence; other captions are not."""
    from ldmkit.quickstart import is_shapes_data

    assert is_shapes_data(shapes_folder)
    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(other / f"{i}.png")
        (other / f"{i}.txt").write_text("a small red circle in the center" if i else "a photo of a cat")
    assert not is_shapes_data(other)


def test_quickstart_tcd_lora_reports_the_method_and_the_teacher_solvers(tmp_path, shapes_folder, monkeypatch, capsys):
    """--method tcd_lora end to end at a tiny size: the report names TCD, the student samples with TCDScheduler
    at gamma 0.3, the teacher has DDIM / DPM++ / UniPC rows at the student's steps, and a second --method in
    the same --out reuses the teacher and its evaluation."""
    from ldmkit.eval import evaluate
    from ldmkit.quickstart import stages

    monkeypatch.setattr(stages, "plan_for", lambda *a, **k: (tiny_plan(), "A tiny plan for a test."))
    out = tmp_path / "qs"
    assert run_quickstart(["--method", "tcd_lora", "--data", str(shapes_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "tcd_lora" and report["student"] == "TCD-LoRA"
    assert report["sampling"] == {
        "scheduler": "tcd",
        "eta": 0.3,
        "guidance": 1.0,
        "lora": True,
        "recorded": True,
        "record_guidance": 1.0,
    }
    assert report["plan_reason"] == "A tiny plan for a test." and report["plan"]["distill_steps"] == 3
    student = json.loads((out / "evaluate" / "tcd_lora" / "results.json").read_text())["run"]
    assert student["scheduler"] == "TCDScheduler" and student["eta"] == 0.3 and student["guidance"] == 1.0
    figs = report["figures"]
    for solver in ("ddim", "dpm", "unipc"):
        for n in (1, 2, 4):
            f = figs[f"teacher_{solver}_{n}"]
            assert f["unet_evals_per_image"] == 2 * n  # guided: a conditional and an unconditional pass per step
            assert f["fd"] is not None and f["fd_to_teacher_50"] is not None and f["adherence"] is not None
    assert figs["teacher_4"]["fd"] == figs["teacher_ddim_4"]["fd"]  # the older key of the same setting
    assert figs["lcm_4"]["method"] == "tcd_lora" and figs["lcm_4"]["unet_evals_per_image"] == 4
    html = (out / "report.html").read_text()
    assert "TCD-LoRA" in html and "DPM++ 2M" in html and "UniPC" in html and "A tiny plan for a test." in html
    assert "LCM" not in html  # the student is named by its method everywhere
    # what next: the export's sampling record gives generate its sampler and eta, so no flags are needed
    assert "ldmkit generate --model" in html and "--scheduler tcd" not in html and "--eta" not in html
    assert "plan: A tiny plan for a test." in printed
    assert "teacher UniPC" in printed and "TCD-LoRA" in printed and "LCM" not in printed

    # A second method in the same --out: data, VAE, teacher and the teacher's evaluation are reused.
    def no_teacher_evaluation(*args, **kwargs):
        raise AssertionError("the teacher was evaluated again")

    monkeypatch.setattr(evaluate, "evaluate_solvers", no_teacher_evaluation)
    assert run_quickstart(["--method", "pcm_lora", "--data", str(shapes_folder), "--out", str(out)]) == 0
    second = json.loads((out / "report.json").read_text())
    assert second["student"] == "PCM-LoRA" and second["sampling"]["eta"] == 0.0
    assert second["figures"]["teacher_unipc_2"] == figs["teacher_unipc_2"]
    assert second["figures"]["lcm_4"]["method"] == "pcm_lora"
    assert (out / "evaluate" / "tcd_lora" / "results.json").is_file()  # each method keeps its own evaluation
    for method, student in (("tcd_lora", "TCD-LoRA"), ("pcm_lora", "PCM-LoRA")):  # and its own report
        kept = json.loads((out / "reports" / method / "report.json").read_text())
        assert kept["student"] == student and (out / "reports" / method / "grids.png").is_file()
        assert student in (out / "reports" / method / "report.html").read_text()


def test_quickstart_offers_dmd2_lora_and_samples_it_as_its_record_says(tmp_path, shapes_folder, monkeypatch):
    """--method dmd2_lora end to end at a tiny size: a method offered by its class (quickstart_student), its
    4-step generator sampled at 1, 2 and 4 steps with the LCMScheduler its export records."""
    from ldmkit.quickstart import stages, student_methods

    assert {"lcm_lora", "tcd_lora", "pcm", "dmd2_lora"} <= set(student_methods())
    monkeypatch.setattr(stages, "plan_for", lambda *a, **k: (tiny_plan(), "A tiny plan for a test."))
    out = tmp_path / "qs"
    assert run_quickstart(["--method", "dmd2_lora", "--data", str(shapes_folder), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"] == "DMD2-LoRA" and report["sampling"]["scheduler"] == "lcm"
    assert report["sampling"]["recorded"] and report["sampling"]["guidance"] == 1.0
    for n in (1, 2, 4):
        assert report["figures"][f"lcm_{n}"]["method"] == "dmd2_lora"
        assert report["figures"][f"lcm_{n}"]["unet_evals_per_image"] == n
    # caption adherence judges the student at 4 steps and at the one step one-step methods are made for
    models = report["caption_adherence"]["models"]
    assert set(models) == {"teacher_8", "lcm_4", "lcm_1"}
    assert models["lcm_1"]["sensitivity"] != models["lcm_4"]["sensitivity"]  # two samplings, not one copied


# ----------------------------------------------------------------------------------------------------
# plan_for: the steps follow the data and the minutes


def _steps(plan) -> tuple[int, int, int]:
    return plan.vae_steps, plan.teacher_steps, plan.distill_steps


@pytest.mark.parametrize("method", ["lcm_lora", "lcd", "tcd_lora", "pcm"])
def test_default_plan_is_the_full_plan(method):
    """No --minutes on the shapes (4000 images, 120 captions): exactly the full plan the README measured, for
    every method; so is free-form data with fewer captions (fewer captions never lower the steps). Class labels
    (the glyphs: 10 captions that differ in one word) double the teacher's steps, and the default budget grows
    by their time, so the other stages keep theirs."""
    from ldmkit.quickstart import FULL, LABELLED_TEACHER_FACTOR, QUICK, full_plan_minutes, plan_for

    for captions in (120, 10):
        plan, reason = plan_for(4000, captions, None, False, method=method)
        assert plan == FULL
        assert "No --minutes" in reason and "VAE 600 steps" in reason and "teacher 2000" in reason
    labelled, reason = plan_for(4000, 10, None, False, method=method, labelled=True)
    assert labelled == replace(FULL, teacher_steps=int(FULL.teacher_steps * LABELLED_TEACHER_FACTOR))
    assert "class labels" in reason and "full plan for class-labelled data" in reason
    assert full_plan_minutes(method, labelled=True) > full_plan_minutes(method)
    # an explicit budget of the shapes' full plan cannot hold the longer teacher: every stage gives way
    tight = plan_for(4000, 10, full_plan_minutes(method), False, method=method, labelled=True)[0]
    assert (
        FULL.teacher_steps < tight.teacher_steps < labelled.teacher_steps and tight.distill_steps < FULL.distill_steps
    )
    assert plan_for(500, 120, None, True, method=method)[0] == QUICK == plan_for(500, 7, 30, True)[0]  # fixed


def test_small_data_caps_the_steps():
    from ldmkit.quickstart import BATCH, FULL, MAX_PASSES, MIN_STEPS, plan_for

    plan, reason = plan_for(500, 120)
    assert all(a < b for a, b in zip(_steps(plan), _steps(FULL)))  # fewer images: fewer useful steps
    assert plan.num_images == 500 and "500 images scale them by 0.35" in reason
    assert "less than the" in reason  # it needs less than the default budget, and says so
    plan, reason = plan_for(300, 120, 30)
    assert plan.distill_steps * BATCH["distill"] <= MAX_PASSES["distill"] * 300  # held to 40 passes
    assert "at most 40 passes over the 300 images for the distillation" in reason
    # Tiny data: the floors win, and the reason warns that the models will memorise it.
    plan, reason = plan_for(48, 48)
    assert _steps(plan) == (MIN_STEPS["vae"], MIN_STEPS["teacher"], MIN_STEPS["distill"])
    assert "memorise" in reason


def test_more_data_and_captions_want_more_steps():
    from ldmkit.quickstart import FULL, plan_for

    # More distinct captions: the teacher gets a bigger share, even within the default budget.
    assert plan_for(4000, 480)[0].teacher_steps > FULL.teacher_steps
    assert "480 captions the teacher's by a further 2.00" in plan_for(4000, 480)[1]
    # Ten times the images: more of every stage when the minutes allow it, the full budget otherwise.
    big, reason = plan_for(40000, 120, 60)
    assert all(a > b for a, b in zip(_steps(big), _steps(FULL))) and "less than the 60.0 min" in reason
    capped, reason = plan_for(40000, 120)
    assert capped.teacher_steps < big.teacher_steps and "to fit" in reason


def test_minutes_scale_the_plan():
    from ldmkit.quickstart import FULL, full_plan_minutes, plan_for
    from ldmkit.quickstart.plan import _seconds

    full_minutes = full_plan_minutes()
    assert 14 < full_minutes < 17  # the README's 15.1 min run, with the teacher solvers added to evaluation
    plans = [plan_for(4000, 120, m)[0] for m in (7, 10, 13)]
    for a, b in zip(plans, plans[1:]):
        assert all(x < y for x, y in zip(_steps(a), _steps(b)))  # more minutes, more steps
    for minutes, plan in zip((7, 10, 13), plans):
        steps = dict(zip(("vae", "teacher", "distill"), map(float, _steps(plan))))
        assert _seconds(steps, "lcm_lora", 4000) / 60 <= minutes * 1.01  # within the budget (steps in tens)
    plan, reason = plan_for(4000, 120, 8)
    assert "to fit 8.0 min" in reason and plan.teacher_steps / FULL.teacher_steps == pytest.approx(
        plan.distill_steps / FULL.distill_steps, abs=0.01
    )  # every stage scaled by one factor
    assert plan_for(4000, 120, 120)[0] == FULL  # more minutes than useful change nothing
    # A full student's distillation is planned with its own measured step cost, and fits too.
    lcd = plan_for(4000, 120, 8, method="lcd")[0]
    steps = dict(zip(("vae", "teacher", "distill"), map(float, _steps(lcd))))
    assert _seconds(steps, "lcd", 4000) / 60 <= 8 * 1.01 and lcd.distill_steps != plan.distill_steps


def test_too_small_budget_runs_the_minimum_and_says_so():
    from ldmkit.errors import UserError
    from ldmkit.quickstart import MIN_STEPS, plan_for

    plan, reason = plan_for(4000, 120, 1)
    assert _steps(plan) == (MIN_STEPS["vae"], MIN_STEPS["teacher"], MIN_STEPS["distill"])
    assert "The budget of 1.0 min is too small" in reason and "running those" in reason
    for bad in (0, -3, float("nan")):
        with pytest.raises(UserError, match="--minutes must be a positive number"):
            plan_for(4000, 120, bad)


def test_stages_started_in_the_folder_keep_their_steps():
    """A second --method (or other --minutes) in the same --out keeps the VAE and teacher it trained; only the
    distillation is planned, within the minutes, and the time of finished stages is not counted."""
    from ldmkit.quickstart import plan_for

    plan, reason = plan_for(4000, 120, 5, method="tcd", done={"vae": (600, 0), "teacher": (2000, 0)})
    assert (plan.vae_steps, plan.teacher_steps) == (600, 2000) and 300 <= plan.distill_steps < 1500
    assert "The teacher was already trained in this folder with 2000 steps: kept" in reason
    # an interrupted teacher: its steps stay and what is left of it costs time
    later = plan_for(4000, 120, 5, method="tcd", done={"vae": (600, 0), "teacher": (2000, 1000)})[0]
    assert later.teacher_steps == 2000 and later.distill_steps < plan.distill_steps


def test_started_stages_are_read_from_the_run_folders(tmp_path):
    from ldmkit.quickstart.stages import _started_stages

    teacher = tmp_path / "teacher"
    (teacher / "checkpoints" / "step-0000400").mkdir(parents=True)
    # a complete checkpoint (train/checkpoint.py: trainer_state.json marks it); an unfinished one does not count
    (teacher / "checkpoints" / "step-0000400" / "trainer_state.json").write_text('{"step": 400}')
    (teacher / "checkpoints" / ".tmp-step-0000500").mkdir()
    (teacher / "config.yaml").write_text("train:\n  max_steps: 2000\n")
    vae = tmp_path / "vae"
    (vae / "export").mkdir(parents=True)
    (vae / "config.yaml").write_text("train:\n  max_steps: 600\n")
    (vae / "export" / "ldmkit_config.yaml").write_text("")
    assert _started_stages(tmp_path, "tcd_lora") == {"vae": (600, 0), "teacher": (2000, 1600)}


def test_labelled_captions_get_a_layerless_encoder_with_a_caption_long_context(tmp_path):
    """Captions that differ in one word (the glyphs) get a text encoder without transformer layers and a context
    as long as the longest caption, and the report's plan says so; free-form captions (the shapes) keep the
    2-layer, 32-token encoder. The label's word must then be what tells the encoded captions apart."""
    import random

    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldmkit.data import glyphs, synth
    from ldmkit.quickstart import TEXT_LAYERS, TEXT_MAX_LENGTH, data_size, stage_text, text_encoder_plan

    shapes = [synth.caption(synth.sample_attrs(random.Random(i))) for i in range(300)]
    assert text_encoder_plan(shapes) == ({"num_layers": TEXT_LAYERS, "max_length": TEXT_MAX_LENGTH}, "")
    labelled = [glyphs.caption(glyphs.make_sample(i, 32, 0)[1]) for i in range(300)]
    shape, why = text_encoder_plan(labelled)
    # "a drawing of the letter x": BOS + 6 words + EOS
    assert shape == {"num_layers": 0, "max_length": 8} and "one word" in why

    data = tmp_path / "data"
    synth.write_dataset(data, num=300, size=32, seed=0, kind="glyphs")  # >= 10 images per label
    assert data_size(data) == (300, len(glyphs.LABELS), True)  # what the plan is given: labelled data
    base, stats = stage_text(tmp_path, data, seed=0)
    assert stats["encoder"] == {**shape, "why": why}
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    assert encoder.config.num_hidden_layers == 0 and tokenizer.model_max_length == 8
    prompts = glyphs.heldout_prompts(len(glyphs.LABELS))
    ids = tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids)[0]  # (10, 8, 64)
    differs = (hidden - hidden[:1]).abs().amax(dim=(0, 2)) > 1e-6  # per position: any caption differs from the first
    assert differs.tolist() == [False] * 6 + [True, False]  # only the label's token (position 6) tells them apart


def test_a_method_with_a_shorter_useful_distillation_gets_its_share_of_the_full_plan():
    """dmd2_lora's quickstart_distill_factor (measured: its 1-step FD rises with longer distillation) scales the
    full plan's distillation steps and the default budget; the other stages keep the full plan's steps."""
    from ldmkit.methods.configs import DMD2LoraConfig
    from ldmkit.quickstart import FULL, full_plan_minutes, plan_for

    factor = DMD2LoraConfig.quickstart_distill_factor
    assert 0 < factor < 1
    plan, reason = plan_for(4000, 120, None, False, method="dmd2_lora")
    assert (
        plan
        == replace(FULL, distill_steps=int(round(FULL.distill_steps * factor / 10)) * 10)
        == replace(FULL, distill_steps=400)
    )
    assert "distillation 400" in reason
    assert full_plan_minutes("dmd2_lora") < full_plan_minutes("lcm_lora") * 1.5  # its steps cost more, fewer run
    assert plan_for(4000, 120, 60, False, method="dmd2_lora")[0].distill_steps == 400  # more minutes: no more steps
