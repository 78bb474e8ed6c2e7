"""Helpers for tests that read training runs or launch several processes (imported by test modules)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path


def logged(run: Path, key: str = "loss") -> list[float]:
    """One value per logged step from a run's metrics.jsonl."""
    return [json.loads(line)[key] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def assert_same_exports(a: Path, b: Path, base: Path, atol: float = 1e-6) -> None:
    """Two export folders hold the same safetensors files with equal tensors (within ``atol``), and the
    export is trained: a LoRA up-projection (zero at init) is non-zero, or a tensor differs from the one
    at the same path in the ``base`` model folder."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in Path(a).rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in Path(b).rglob("*.safetensors"))
    moved = False
    for f in files:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol)
        orig = load_file(str(base / f)) if (base / f).is_file() else {}
        moved |= any(
            ("lora_B" in k and ta[k].abs().max() > 0) or (k in orig and not torch.equal(ta[k], orig[k])) for k in ta
        )
    assert moved, f"{a} equals its base model: nothing was trained"


def launch_two() -> list[str]:
    """``accelerate launch`` of 2 CPU processes (gloo) on a free port: other test runs on the machine may
    hold accelerate's default 29500. Append ``-m module args`` or a script."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]


def assert_debug_recipe_resumes(
    name: str, arch: str, model: Path, data: Path, tmp_path: Path, extra: tuple[str, ...] = ()
) -> None:
    """The ``name`` debug recipe (``debug`` for sd15, ``debug_<arch>`` else) on ``model``, trained from the
    data cache 4 steps at once and 2 + 2 steps (a restart in between), gives the same export and losses."""
    import pytest

    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    recipe = f"{name}/{'debug' if arch == 'sd15' else 'debug_' + arch}"

    def cfg(run: str, steps: int):
        return load_config(
            recipe,
            [
                f"--model.pretrained={model}",
                f"--data.path={data}",
                f"--data.cache_dir={tmp_path / 'cache'}",
                f"--train.max_steps={steps}",
                "--train.checkpoint_every=2",
                "--train.validate_every=0",
                "--train.validation_prompts=[]",
                "--train.batch_size=2",
                f"--output_dir={tmp_path / run}",
                *extra,
            ],
        )

    train(cfg("full", 4))
    train(cfg("resumed", 2))
    train(cfg("resumed", 4))
    assert_same_exports(tmp_path / "full" / "export", tmp_path / "resumed" / "export", model)
    la, lb = logged(tmp_path / "full"), logged(tmp_path / "resumed")
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)


def crash_after_step(monkeypatch, method_cls: type, at: int) -> None:
    """Make ``method_cls.after_step`` raise "simulated crash" right after optimizer step ``at`` (a killed run:
    the checkpoints before it stay, nothing after it is written)."""
    original = method_cls.after_step

    def after_step(self, step):
        original(self, step)
        if step == at:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(method_cls, "after_step", after_step)
