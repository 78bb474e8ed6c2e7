"""lcm_lora, lcd, uvit, dmd2_lora and dmd2 on two processes (accelerate launch, gloo on CPU) reproduce the
one-process run.

What could break here and nowhere else: the LCM-LoRA teacher pass disables the adapters of the
DDP-wrapped UNet; the full-LCD EMA target and the U-ViT EMA are updated outside DDP on every rank and
must stay identical; w, timesteps, noise and CFG dropout must come from per-sample seeds so that two
ranks x batch 1 draw what one process x batch 2 draws. Tolerances as in test_e2e_foundation.py
(float32 all-reduce order). The same command runs on several machines (README: GPUs, several GPUs
and machines); only the launcher's arguments change.

DMD2 adds: generator and fake-score turns alternating (the step counter on every rank), a GAN classifier
and a fake score (dmd2_lora: a second LoRA called through the generator's DDP-wrapped denoiser; dmd2: a
second UNet) as DDP modules of their own, parameters that get no gradient on fake-score turns, and
backward simulation, whose draws per sample must not depend on the largest step of its batch-mates (it
did: from step 1, loss 1.2190 on two processes against 1.1595 on one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import launch_two, logged
from helpers.threads import thread_env

ROOT = Path(__file__).parents[1]
ENV = thread_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
EXPORTED = {
    "lcm_lora": "pytorch_lora_weights.safetensors",
    "lcd": "unet/diffusion_pytorch_model.safetensors",
    "uvit": "unet/diffusion_pytorch_model.safetensors",
    "dmd2_lora": "pytorch_lora_weights.safetensors",
    "dmd2": "unet/diffusion_pytorch_model.safetensors",
}
# Both DMD2 turns (the generator's, then the fake score's, twice) with the GAN term on.
DMD2 = [
    "--method.dfake_gen_update_ratio=2",
    "--method.gen_cls_loss_weight=1e-3",
    "--method.guidance_cls_loss_weight=1e-2",
]
STEPS = {"dmd2_lora": 4, "dmd2": 4}  # dmd2: see the parametrization


def _args(name: str, model: Path, data: Path, out: Path, batch: int) -> list[str]:
    source = ["--data.format=folder", "--data.cache=true"] if name == "uvit" else []  # its recipe reads features
    return [
        "-m",
        "ldmkit",
        "train",
        str(ROOT / "configs" / name / "debug.yaml"),
        f"--model.pretrained={model}",
        f"--data.path={data}",
        *source,
        *(DMD2 if name.startswith("dmd2") else []),
        f"--data.cache_dir={out.parent / 'cache'}",
        f"--output_dir={out}",
        f"--train.batch_size={batch}",
        f"--train.max_steps={STEPS.get(name, 3)}",
        "--train.checkpoint_every=0",
        "--train.log_every=1",
        "--train.validate_every=0",
    ]


@pytest.mark.slow
# dmd2 (two whole UNets) is left out to keep the suite short: it runs the same loss, turns, counter and GAN
# code; what only it has, a second plain UNet under DDP, lcd covers (measured with it here: losses within
# 2e-6, weights 0.12% overall and tensor by tensor within rtol 1e-3, atol 3e-5).
@pytest.mark.parametrize("name", ["lcm_lora", "lcd", "uvit", "dmd2_lora"])
def test_two_processes_reproduce_one(name, tiny_sd15, shapes_folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run(
        [sys.executable, *_args(name, tiny_sd15, shapes_folder, one, 2)], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [*launch_two(), "-m", *_args(name, tiny_sd15, shapes_folder, two, 1)[1:]],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    l1, l2 = logged(one), logged(two)
    assert len(l1) == len(l2) == STEPS.get(name, 3)
    if name.startswith("dmd2"):  # both turns ran, the GAN's two sides on theirs
        records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
        assert [r["generator_turn"] for r in records] == [1.0, 0.0, 1.0, 0.0]
        assert all(("gen_cls_loss" in r) == bool(r["generator_turn"]) and "guidance_cls_loss" in r for r in records)
    assert min(abs(a - b) / b for a, b in zip(l1, l1[1:])) > 1e-3  # not a flat curve
    assert l2 == pytest.approx(l1, rel=1e-4)
    a, b = load_file(str(one / "export" / EXPORTED[name])), load_file(str(two / "export" / EXPORTED[name]))
    assert a.keys() == b.keys()
    # The weights' change over the run (LoRA B starts at zero; the LCD student at the teacher, its new
    # guidance projection at zero) agrees to 1% overall (measured: 0.6% LoRA B, 0.14% LCD; a different
    # sample, noise draw or timestep on one rank gives O(1)).
    if name in ("lcm_lora", "dmd2_lora"):
        keys, init = [k for k in a if "lora_B" in k], {}
    elif name == "uvit":  # from scratch: compare the exported EMA weights to the first run's
        keys, init = list(a), {}
    else:
        keys, init = list(a), load_file(str(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors"))
    change = sum(float((a[k] - init.get(k, torch.zeros_like(a[k]))).square().sum()) for k in keys) ** 0.5
    diff = sum(float((a[k] - b[k]).square().sum()) for k in keys) ** 0.5
    assert change > 0 and diff / change < 1e-2
    if name.startswith("dmd2"):
        # Measured 0.06% (dmd2_lora) and 0.12% (dmd2) overall; dmd2 passes the tensor-by-tensor check
        # below, but dmd2_lora has one element in each of 6 LoRA tensors off by 3e-5 to 1e-4 (a tenth of
        # an Adam step at its lr 1e-3; the rest of those tensors within 4e-7): Adam's normalisation turning
        # the rounding of a near-zero gradient element into part of a step. The rounding is the forward's
        # at batch 2 (one process) against 1 (a rank): two processes equal one process with batch 1 and 2
        # accumulation steps exactly. So: a handful of elements (6 of 72832), none off by a step; a wrong
        # draw or gradient moves nearly all of them by O(lr).
        off = sum(int((b[k] - a[k]).abs().gt(3e-5 + 1e-3 * a[k].abs()).sum()) for k in a)
        assert off < 1e-3 * sum(a[k].numel() for k in a)
        assert max(float((b[k] - a[k]).abs().max()) for k in a) < 2e-4
        return
    # Tensor by tensor, except the barely trained ones (max |w| < 1e-3: LCM-LoRA's time_emb_proj B, whose
    # gradients are ~1e-9, so Adam's normalisation turns all-reduce rounding into +-lr steps).
    for k in a:
        if a[k].abs().max() >= 1e-3:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=3e-5)
