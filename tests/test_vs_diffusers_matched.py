"""benchmarks/vs_diffusers.py's ``matched`` setting: ldmkit's LCD passes under the peer's autocast. At
--mixed_precision=no diffusers' LCM scripts still run the teacher passes (and, in the LoRA script, the
target pass) under torch.autocast(device); the benchmark's child process patches ldmkit to do the same, and
this checks that the patch reaches exactly those passes (the peer itself is not installed here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ldmkit.methods.lcd import _LCDBase

from helpers.lcm import fixed_batch
from helpers.lcm import make_distill_method as make_method

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_diffusers.py"


@pytest.fixture
def bench(monkeypatch):
    """The benchmark module; ldmkit's consistency_pair restored afterwards (the patch is for a child process)."""
    monkeypatch.setattr(_LCDBase, "consistency_pair", _LCDBase.consistency_pair)
    spec = importlib.util.spec_from_file_location("vs_diffusers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pass_dtypes(method) -> list[torch.dtype]:
    """Output dtype of every denoiser call of one loss, in order: student, teacher pass(es), target."""
    seen, denoise = [], method.family.denoise

    def recording(*args, **kwargs):
        out = denoise(*args, **kwargs)
        seen.append(out.dtype)
        return out

    method.family.denoise = recording
    loss = method.loss(fixed_batch(2))[0]
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    return seen


@pytest.mark.parametrize("name", ["lcm_lora", "lcd"])
def test_matched_setting_autocasts_the_peers_passes_only(tmp_path, tiny_sd15, bench, name):
    fp32, low = torch.float32, torch.get_autocast_dtype("cpu")  # bf16: autocast's default on a CPU
    assert _pass_dtypes(make_method(name, tiny_sd15, tmp_path / "plain")) == [fp32, fp32, fp32]
    bench.match_peer_autocast(bench.PEER_AUTOCAST[name])
    student, teacher, target = _pass_dtypes(make_method(name, tiny_sd15, tmp_path / "matched"))
    assert student == fp32 and teacher == low  # the student keeps the tool's own precision
    assert target == (low if name == "lcm_lora" else fp32)  # the full peer's target autocast is off at "no"


def test_the_peer_autocast_table_names_known_passes(bench):
    assert set(bench.PEER_AUTOCAST) == set(bench.PEER_SCRIPTS)
    with pytest.raises(SystemExit, match="unknown autocast passes"):
        bench.match_peer_autocast(("student",))
