"""What a user of ``ldmkit train`` sees and chooses: optimizers, trackers, the validation prompts file, the
end-of-run summary and a quiet console (issue 13)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldmkit.errors import UserError
from ldmkit.methods import load_config
from ldmkit.train.loop import make_optimizer, train

ROOT = Path(__file__).parents[1]


def toy(tmp: Path, data: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            "--method.name=toy",
            f"--data.path={data}",
            "--data.resolution=16",
            "--data.num_workers=0",
            "--train.batch_size=4",
            "--train.max_steps=3",
            "--train.learning_rate=1e-2",
            "--train.checkpoint_every=0",
            "--train.report_to=none",
            f"--output_dir={tmp / name}",
            *extra,
        ],
    )


OPTIMIZERS = {
    "adamw": ("torch", "AdamW"),
    "adafactor": ("transformers", "Adafactor"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "lion": ("lion_pytorch", "Lion"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains(name, tmp_path, shapes_folder):
    package, cls = OPTIMIZERS[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install ldmkit[optimizers])")
    lr = "1.0" if name == "prodigy" else "1e-3"  # Prodigy estimates the step size itself (lr is a multiplier)
    cfg = toy(tmp_path, shapes_folder, name, f"--train.optimizer={name}", f"--train.learning_rate={lr}")
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(cfg, params, 1)).__name__ == cls
    export = train(cfg)
    net = load_file(str(export / "toy.safetensors"))
    torch.manual_seed(0)  # ToyMethod's init
    w = 16
    init = torch.nn.Sequential(
        torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(w, 3, 3, padding=1)
    )
    moved = max((net[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 0, f"{name} did not change the weights"
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_optimizer_args_reach_the_optimizer_and_bad_ones_are_one_line(tmp_path, shapes_folder):
    cfg = toy(tmp_path, shapes_folder, "args", "--train.optimizer=adamw", "--train.optimizer_args={amsgrad: true}")
    opt = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1)
    assert opt.param_groups[0]["amsgrad"] is True
    cfg = toy(tmp_path, shapes_folder, "args2", "--train.optimizer_args={no_such_knob: 1}")
    with pytest.raises(UserError, match="optimizer_args.*no_such_knob"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1)


def test_adamw_is_fused_and_steps_as_torchs_reference(tmp_path, shapes_folder):
    """The fused kernel (benchmarks/optimizer_step.py) where the parameters allow it; the same update as torch's
    per-tensor AdamW to rounding; the user's foreach / fused choice in optimizer_args wins."""
    cfg = toy(tmp_path, shapes_folder, "fused", "--train.optimizer=adamw", "--train.adam_weight_decay=0.01")
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(3)]
    ours, ref = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    opt = make_optimizer(cfg, ours, 1)
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    plain = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    for step in grads:
        for o, params in ((opt, ours), (plain, ref)):
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            o.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, init[0] if a.ndim == 2 else init[1])
    cfg = toy(tmp_path, shapes_folder, "foreach", "--train.optimizer_args={foreach: true}")
    opt = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    # parameters the kernel does not take (integers cannot have gradients; a meta tensor stands for an
    # unsupported device): foreach
    cfg = toy(tmp_path, shapes_folder, "meta", "--train.optimizer=adamw")
    opt = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2, device="meta"))], 1)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_missing_optimizer_package_is_one_line(tmp_path, shapes_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import fails as if not installed
    cfg = toy(tmp_path, shapes_folder, "nolion", "--train.optimizer=lion")
    with pytest.raises(UserError, match="pip install lion-pytorch"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1)


def test_old_use_8bit_adam_means_adamw8bit(tmp_path, shapes_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it (it needs a GPU)
    cfg = toy(tmp_path, shapes_folder, "bnb", "--train.use_8bit_adam=true")
    with pytest.raises(UserError, match="optimizer=adamw8bit needs the bitsandbytes package"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1)


def test_tensorboard_writes_logs(tmp_path, shapes_folder):
    train(toy(tmp_path, shapes_folder, "tb", "--train.report_to=tensorboard"))
    assert list((tmp_path / "tb" / "logs").rglob("events.out.tfevents.*"))


def test_another_tracker_gets_the_metrics(tmp_path, shapes_folder, monkeypatch):
    """mlflow through accelerate, with a stand-in for the mlflow package (not installed offline): the loop
    hands report_to to accelerate, which calls the tracker with the config and every logged step."""
    import accelerate.tracking as tracking
    from accelerate.tracking import GeneralTracker

    seen: dict = {"config": None, "logs": []}

    class StubMLflow(GeneralTracker):
        name = "mlflow"
        requires_logging_directory = False

        def __init__(self, run_name, **kwargs):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            seen["config"] = values

        def log(self, values, step=None, **kwargs):
            seen["logs"].append((step, values))

    available = tracking.get_available_trackers
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [*available(), tracking.LoggerType.MLFLOW])
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "mlflow", StubMLflow)
    train(toy(tmp_path, shapes_folder, "mlflow", "--train.report_to=mlflow"))
    assert seen["config"]["train.max_steps"] == 3 and seen["config"]["method.name"] == "toy"
    assert [s for s, _ in seen["logs"]] == [1, 2, 3] and all("loss" in v for _, v in seen["logs"])


def test_tracker_errors_are_one_line(tmp_path, shapes_folder, monkeypatch):
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'"):
        toy(tmp_path, shapes_folder, "bad", "--train.report_to=tensorbord")
    import accelerate.tracking as tracking

    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [tracking.LoggerType.TENSORBOARD])
    with pytest.raises(UserError, match="report_to=wandb needs the wandb package: pip install wandb"):
        train(toy(tmp_path, shapes_folder, "wandb", "--train.report_to=tensorboard,wandb"))


def test_validation_prompts_file(tmp_path, shapes_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n")
    cfg = toy(
        tmp_path, shapes_folder, "p", "--train.validation_prompts=[a cat]", f"--train.validation_prompts_file={prompts}"
    )
    assert cfg.train.validation_prompts == ["a cat", "a red circle", "a blue square"]
    with pytest.raises(UserError, match="validation_prompts_file not found"):
        toy(tmp_path, shapes_folder, "p", f"--train.validation_prompts_file={tmp_path / 'nope.txt'}")


def test_end_of_run_summary(tmp_path, shapes_folder, capsys):
    from ldmkit.cli import main

    args = [f"--data.path={shapes_folder}", "--data.resolution=16", "--data.num_workers=0", "--train.batch_size=4"]
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--method.name=toy",
            *args,
            "--train.max_steps=2",
            "--train.report_to=tensorboard",
            f"--output_dir={out}",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("done: toy, 2 steps (to step 2) in ")
    assert "samples/s" in text
    assert f"export:     {out.resolve() / 'export'}" in text
    assert f"metrics:    {out.resolve() / 'metrics.jsonl'}" in text
    assert f"logs:       {out.resolve() / 'logs'}" in text
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["steps"] == 2 and stats["samples"] == 8 and stats["samples_per_s"] > 0


def test_debug_run_prints_no_warnings_without_v(tmp_path, tiny_sd15, shapes_folder):
    """The lcm_lora debug recipe from the command line: no warning lines (dependencies are quiet unless -v),
    the progress bar, the summary with the command to try the export."""
    cmd = [
        sys.executable,
        "-m",
        "ldmkit",
        "train",
        "lcm_lora/debug",
        f"--model.pretrained={tiny_sd15}",
        f"--data.path={shapes_folder}",
        "--train.max_steps=2",
        f"--output_dir={tmp_path / 'run'}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = (r.stdout + r.stderr).replace("\r", "\n").splitlines()
    noise = [line.replace(str(tmp_path), "") for line in lines]  # the test's folder name says "warnings"
    assert not [line for line in noise if re.search(r"(?i)warn|deprecat", line)], "\n".join(lines)
    assert "try it:     ldmkit generate --model" in r.stdout and "--lora" in r.stdout
    export = (tmp_path / "run" / "export").resolve()
    card = (export / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])  # the Hugging Face metadata block
    assert meta["library_name"] == "diffusers" and {"lora", "lcm", "ldmkit"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "a large red circle in the center"
    assert (export / "samples.png").is_file() and "![samples](samples.png)" in card  # portable: next to the card
    assert f'pipe.load_lora_weights("{export}")' in card and "num_inference_steps=4" in card
    assert "## Use it in A1111 / ComfyUI" in card and "pytorch_lora_weights_kohya.safetensors" in card
    assert f"ldmkit generate --model {tiny_sd15.resolve()} --lora {export}" in card

    # ldmkit generate picks the sampler, steps and guidance of an LCM-LoRA export by itself
    gen = tmp_path / "gen"
    r = subprocess.run(
        [sys.executable, "-m", "ldmkit", "generate", "--model", str(tiny_sd15), "--lora", str(export), "--prompt", "x"]
        + ["--height", "32", "--width", "32", "--device", "cpu", "--out", str(gen)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    settings = json.loads((gen / "generate.json").read_text())
    assert settings["scheduler_class"] == "LCMScheduler" and settings["steps"] == 4 and settings["guidance"] == 1.0


def test_labelled_grid_keeps_the_images_and_draws_the_labels():
    import numpy as np
    from PIL import Image

    from ldmkit.inference import image_grid, label_margins

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    grid = image_grid(images, 2, row_labels=["a red circle", "a long prompt " * 6], col_labels=["1 step", "4 steps"])
    left, top, s = label_margins((32, 32), True, True)
    assert s == 3  # 32 px images are blown up to 96 px cells
    c = 32 * s
    assert grid.size == (left + 2 * c, top + 2 * c)
    a = np.asarray(grid)
    for k, colour in enumerate(colours):  # every cell where it belongs, untouched but for its size
        i, j = divmod(k, 2)
        cell = a[top + c * i : top + c * (i + 1), left + c * j : left + c * (j + 1)]
        assert (cell == colour).all()
    assert (a[:top, left:] < 128).any(), "no column labels drawn"
    for i in range(2):  # each row has its prompt drawn in the left band
        assert (a[top + c * i : top + c * (i + 1), :left] < 128).any(), f"no label for row {i}"
    plain = image_grid(images, 2)
    assert plain.size == (64, 64)
