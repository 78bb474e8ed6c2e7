"""``ldmkit quickstart --quick`` end to end: every stage runs, the report is complete and valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STAGES = ("data", "base", "vae", "teacher", "distilled")
SETTINGS = ("teacher_50", "teacher_4", "lcm_1", "lcm_2", "lcm_4")


@pytest.mark.slow
def test_quickstart_quick_writes_a_valid_report(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "ldmkit", "quickstart", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=env)
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

    # Re-running skips every finished stage and rewrites the same figures.
    r2 = subprocess.run([sys.executable, "-m", "ldmkit", "quickstart", "--quick", "--out", str(out)],
                        capture_output=True, text=True, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["figures"]["lcm_4"]["adherence"] == figs["lcm_4"]["adherence"]
    assert again["seconds_total"] < report["seconds_total"] / 2
