"""The training loop: resume equality, checkpoints, clipping, logging, config errors, multi-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.errors import UserError
from ldmkit.methods import load_config
from ldmkit.train.loop import train

from helpers.runs import launch_two, logged
from helpers.threads import thread_env

ROOT = Path(__file__).parents[1]


def toy_config(tmp: Path, data: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            "--method.name=toy",
            f"--data.path={data}",
            "--data.resolution=16",
            "--data.num_workers=0",
            "--train.batch_size=4",
            "--train.max_steps=6",
            "--train.learning_rate=1e-2",
            "--train.seed=3",
            "--train.checkpoint_every=3",
            "--train.report_to=none",
            f"--output_dir={tmp / name}",
            *extra,
        ],
    )


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "toy.safetensors"))


def test_resumed_run_equals_uninterrupted(tmp_path, shapes_folder, monkeypatch):
    from helpers.toy_method import ToyMethod

    train(
        toy_config(
            tmp_path,
            shapes_folder,
            "full",
            "--method.use_ema=true",
            "--data.random_flip=true",
            "--train.lr_scheduler=cosine",
            "--train.lr_warmup_steps=2",
        )
    )
    monkeypatch.setattr(ToyMethod, "crash_at_step", 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            toy_config(
                tmp_path,
                shapes_folder,
                "killed",
                "--method.use_ema=true",
                "--data.random_flip=true",
                "--train.lr_scheduler=cosine",
                "--train.lr_warmup_steps=2",
            )
        )
    monkeypatch.setattr(ToyMethod, "crash_at_step", 0)
    killed = tmp_path / "killed"
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-0000003"]
    # a half-written checkpoint must never be resumed from
    (killed / "checkpoints" / ".tmp-step-0000004").mkdir()
    train(
        toy_config(
            tmp_path,
            shapes_folder,
            "killed",
            "--method.use_ema=true",
            "--data.random_flip=true",
            "--train.lr_scheduler=cosine",
            "--train.lr_warmup_steps=2",
        )
    )
    a, b = weights(tmp_path / "full"), weights(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    la, lb = logged(tmp_path / "full"), logged(killed)
    assert len(lb) == 6 and la == pytest.approx(lb, rel=1e-5)
    # the EMA state travelled through the checkpoint too
    ea = load_file(str(tmp_path / "full" / "checkpoints" / "step-0000006" / "extra.safetensors"))
    eb = load_file(str(killed / "checkpoints" / "step-0000006" / "extra.safetensors"))
    assert any(k.startswith("ema.") for k in ea)
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6)


def test_run_layout_limit_and_loss_decreases(tmp_path, shapes_folder):
    cfg = toy_config(
        tmp_path,
        shapes_folder,
        "run",
        "--train.max_steps=40",
        "--train.checkpoint_every=10",
        "--train.checkpoints_total_limit=2",
    )
    train(cfg)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000030", "step-0000040"]
    assert (run / "config.yaml").is_file() and (run / "export" / "ldmkit_config.yaml").is_file()
    losses = logged(run)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    # running the finished command again does not train again
    mtime = (run / "export" / "toy.safetensors").stat().st_mtime
    train(cfg)
    assert (run / "export" / "toy.safetensors").stat().st_mtime == mtime


def test_gradient_clipping_really_clips(tmp_path, shapes_folder, monkeypatch):
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.cat(grads).norm().item())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(toy_config(tmp_path, shapes_folder, "noclip", "--train.max_steps=2", "--train.max_grad_norm=null"))
    unclipped = list(seen)
    seen.clear()
    train(toy_config(tmp_path, shapes_folder, "clip", "--train.max_steps=2", "--train.max_grad_norm=0.001"))
    assert min(unclipped) > 0.01
    assert max(seen) <= 0.001 * 1.0001
    norms = logged(tmp_path / "clip", "grad_norm")
    # the log reports the norm before clipping (step 1 only: after a clipped step the weights differ)
    assert norms[0] == pytest.approx(unclipped[0], rel=1e-4) and norms[0] > 0.001


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"lora_rnk") as e:
        load_config(None, ["--method.name=toy", "--method.lora_rnk=3"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="train.max_steps"):
        load_config(None, ["--method.name=toy", "--train.max_steps=abc"])
    with pytest.raises(UserError, match="unknown method.name 'nope'"):
        load_config(None, ["--method.name=nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: toy\nmodel:\n  pretraind: x\n")
    with pytest.raises(UserError, match="pretraind"):
        load_config(str(bad))
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_dry_run_prints_resolved_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: toy\ntrain:\n  max_steps: 7\n")
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "ldmkit", "train", str(recipe), "--dry-run", "--method.width=5"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "max_steps: 7" in out and "width: 5" in out
    err = subprocess.run(
        [sys.executable, "-m", "ldmkit", "train", str(recipe), "--method.widht=5"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert err.returncode == 2 and err.stderr.strip().count("\n") == 0 and "widht" in err.stderr


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, shapes_folder):
    """accelerate launch --num_processes 2 (gloo on CPU) reproduces the 1-process loss curve and weights."""
    env = thread_env()
    common = [
        "--method.name=toy",
        f"--data.path={shapes_folder}",
        "--data.resolution=16",
        "--data.num_workers=0",
        "--train.max_steps=5",
        "--train.seed=1",
        "--train.report_to=none",
        "--train.learning_rate=1e-2",
    ]
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "ldmkit", "train", *common, "--train.batch_size=4", f"--output_dir={one}"],
        check=True,
        env=env,
        capture_output=True,
    )
    two = tmp_path / "two"
    r = subprocess.run(
        [*launch_two(), "-m", "ldmkit", "train", *common, "--train.batch_size=2", f"--output_dir={two}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = logged(one), logged(two)
    assert len(l1) == len(l2) == 5
    assert l1 == pytest.approx(l2, rel=1e-4)
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
