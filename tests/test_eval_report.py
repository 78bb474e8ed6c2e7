"""The quickstart's report (ldmkit.eval.report) from a small hand-made evaluation result, and the
distances to a reference image set (ldmkit.eval.distances)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.eval.distances import distances_to
from ldmkit.eval.report import summarise, write_report

PLAN = {"teacher_steps_full": 50, "lcm_steps": [1, 2, 4], "reference_images": 7}
PROMPTS = ["a small red circle in the center", "a large blue square in the top left"]


def _setting(steps: int, seconds: float, adherence: float | None, evals: int) -> dict:
    per_attribute = None if adherence is None else {"color": 1.0, "shape": 0.5, "size": 1.0, "position": 0.5}
    return {
        "steps": steps,
        "seconds_per_image": seconds,
        "unet_evals_per_image": evals,
        "adherence": None if adherence is None else {**per_attribute, "all": adherence},
        "fd": 3.0 + steps,
        "kid": 0.01,
    }


def _results(adherence: bool = True) -> dict:
    a = (lambda v: v) if adherence else (lambda v: None)
    return {
        "prompts": PROMPTS,
        "runs": {
            "teacher_ddim": {"settings": [_setting(4, 0.02, a(0.25), 8), _setting(50, 0.2, a(0.5), 100)]},
            "lcm": {"settings": [_setting(s, 0.005 * s, a(0.1 * s), s) for s in (1, 2, 4)]},
        },
        "distance_to_teacher_50": {n: {"rms": 0.1, "fd": 2.0} for n in ("teacher_4", "lcm_1", "lcm_2", "lcm_4")},
    }


def _image_folders(ev, size: int = 8) -> None:
    for folder in ["teacher_ddim/steps-4", "teacher_ddim/steps-50", *[f"lcm/steps-{s}" for s in (1, 2, 4)]]:
        (ev / folder).mkdir(parents=True)
        for i in range(len(PROMPTS)):
            Image.new("RGB", (size, size), (40 * i, 100, 200)).save(ev / folder / f"{i:05d}.png")


def _report(results: dict) -> dict:
    return {
        "quick": True,
        "method": "lcm_lora",
        "student": "LCM-LoRA",
        "plan": PLAN,
        "exports": {"teacher": "/runs/teacher", "distilled": "/runs/lcm_lora"},
        "text_separation": {"probe_color": 1.0},
        "feature_net": "random-conv-v1-seed0",
        "stage_seconds": {"data": 1.0},
        "figures": summarise(results, PLAN),
        "seconds_total": 90.0,
    }


def test_summarise_names_every_setting():
    figs = summarise(_results(), PLAN)
    assert set(figs) >= {"teacher_50", "teacher_4", "lcm_1", "lcm_2", "lcm_4"}
    assert figs["teacher_50"]["adherence"] == 0.5 and figs["teacher_50"]["unet_evals_per_image"] == 100
    assert figs["lcm_4"]["adherence_per_attribute"]["shape"] == 0.5 and figs["lcm_2"]["fd"] == 5.0
    assert figs["lcm_1"]["rms_to_teacher_50"] == 0.1 and "rms_to_teacher_50" not in figs["teacher_50"]
    assert figs["lcm4_over_teacher50_adherence"] == pytest.approx(0.8)
    assert figs["lcm4_speedup_over_teacher50"] == pytest.approx(10.0)
    # Not shapes captions: no adherence, so no adherence ratio either.
    plain = summarise(_results(adherence=False), PLAN)
    assert plain["lcm_4"]["adherence"] is None and "lcm4_over_teacher50_adherence" not in plain


@pytest.mark.parametrize("adherence", [True, False])
def test_write_report_writes_json_html_and_images(tmp_path, adherence):
    ev = tmp_path / "evaluate" / "lcm_lora"
    _image_folders(ev)
    results = _results(adherence)
    report = _report(results)
    write_report(tmp_path, report, results, ev)

    assert json.loads((tmp_path / "report.json").read_text()) == report
    doc = (tmp_path / "report.html").read_text()
    assert '<img src="grids.png">' in doc and '<img src="quality.png">' in doc
    assert doc.count("<tr><td>") == 5  # a row per setting
    assert "<td>LCM-LoRA</td><td>4</td>" in doc and "/runs/lcm_lora" in doc and "Total time 1.5 min" in doc
    assert "to 7 training images" in doc and "<td>5.0</td><td>1</td></tr>" in doc  # LCM 1: ms and evals / image
    assert ("<td>0.400</td>" in doc) == adherence  # LCM 4 steps' adherence
    with Image.open(tmp_path / "grids.png") as grid:
        # a label column, then the 2 prompts at 8 px scaled by 96 // 8; a row per setting under the captions
        assert grid.size == (230 + 2 * 96, 5 * 96 + 40)
        assert grid.getpixel((230 + 96 + 5, 40 + 5)) == (40, 100, 200)  # prompt 1, teacher 50 steps
    with Image.open(tmp_path / "quality.png") as plot:
        # a row per measure (adherence: all + 4 attributes; FD to the data and to the teacher's 50-step set),
        # against steps and against milliseconds
        assert plot.width > 800 and plot.height == (7 if adherence else 2) * 300
    assert "Quick run.</b>" in doc and "mean nothing" in doc  # quick figures are flagged as meaningless
    assert '<tr class="stage"><td>data</td><td>1.0 s</td></tr>' in doc  # rounded stage times
    teacher, student = Path("/runs/teacher").resolve(), Path("/runs/lcm_lora").resolve()
    assert f"ldmkit generate --model {teacher} --lora {student}" in doc and "ldmkit merge-lora" in doc
    assert not (tmp_path / "losses.png").exists()  # no stage metrics here


def test_teacher_solvers_and_the_student_are_named_in_figures_and_rows():
    """Each teacher solver's settings become ``teacher_<solver>_<steps>`` figures (``teacher_4`` stays as the older
    key of DDIM 4), the student's ``lcm_<steps>`` carry their method, and rows and names say what each is."""
    from ldmkit.eval.report import display_name, table_rows

    results = _results()
    results["runs"]["teacher_ddim"]["settings"] += [_setting(s, 0.002 * s, 0.05 * s, 2 * s) for s in (1, 2)]
    results["runs"]["teacher_dpm"] = {"settings": [_setting(s, 0.002 * s, 0.06 * s, 2 * s) for s in (1, 2, 4)]}
    results["distance_to_teacher_50"] = {
        n: {"rms": 0.1, "fd": 2.0} for n in ("teacher_ddim_4", "teacher_dpm_1", "lcm_1", "lcm_2", "lcm_4")
    }
    figs = summarise(results, PLAN, method="tcd_lora")
    assert figs["teacher_dpm_2"]["unet_evals_per_image"] == 4 and figs["teacher_dpm_1"]["fd_to_teacher_50"] == 2.0
    assert figs["teacher_4"]["fd_to_teacher_50"] == figs["teacher_ddim_4"]["fd_to_teacher_50"] == 2.0
    assert "teacher_ddim_50" not in figs and figs["lcm_2"]["method"] == "tcd_lora"
    report = {"method": "tcd_lora", "student": "TCD-LoRA", "plan": PLAN, "figures": figs}
    rows = table_rows(report)
    assert rows[0] == ("teacher_50", "teacher DDIM") and rows[-1] == ("lcm_4", "TCD-LoRA")
    assert [k for k, _ in rows] == [
        "teacher_50",
        *[f"teacher_ddim_{s}" for s in (1, 2, 4)],
        *[f"teacher_dpm_{s}" for s in (1, 2, 4)],
        *[f"lcm_{s}" for s in (1, 2, 4)],
    ]
    assert display_name("teacher_dpm_1", report) == "teacher DPM++ 2M 1 step"
    assert display_name("lcm_4", report) == "TCD-LoRA 4 steps" and display_name("teacher_50", report).endswith(
        "50 steps"
    )


def test_report_draws_each_stage_loss_curve(tmp_path):
    ev = tmp_path / "evaluate" / "lcm_lora"
    _image_folders(ev)
    results = _results()
    report = _report(results)
    for stage in ("teacher", "lcm_lora"):
        run = tmp_path / "runs" / stage
        (run / "export").mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 9)))
    report["exports"] = {
        "teacher": str(tmp_path / "runs/teacher/export"),
        "distilled": str(tmp_path / "runs/lcm_lora/export"),
    }
    report["quick"] = False
    write_report(tmp_path, report, results, ev)
    doc = (tmp_path / "report.html").read_text()
    assert '<img src="losses.png">' in doc and "Quick run.</b>" not in doc
    with Image.open(tmp_path / "losses.png") as losses:
        assert losses.size == (2 * 440, 300)  # a panel per stage with metrics


def test_distances_to_reference_set(tmp_path):
    ref = np.random.default_rng(0).integers(0, 100, (4, 16, 16, 3))
    for name, shift in (("ref", 0), ("near", 10), ("far", 120)):
        (tmp_path / name).mkdir()
        for i, pixels in enumerate(ref + shift):
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / name / f"{i:05d}.png")
    d = distances_to(tmp_path / "ref", {"near": tmp_path / "near", "far": tmp_path / "far"}, 4)
    assert d["near"]["rms"] == pytest.approx(10 / 255) and d["far"]["rms"] == pytest.approx(120 / 255)
    assert 0 < d["near"]["fd"] < d["far"]["fd"]
