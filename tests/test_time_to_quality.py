"""benchmarks/time_to_quality.py: ldmkit's side of the toy chain (a real run exporting its LoRA on its training
clock), the peer's side from a fake step log and checkpoints (its clock conversion and LoRA key fix), the
evaluation of every LoRA by ldmkit's evaluator, and the table and last line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
ttq = pytest.importorskip("time_to_quality")

LAST_LINE = re.compile(
    r"^time-to-quality: ldmkit reaches the peer's final quality in (\d+\.\d\d|not reached) of its time$"
)


def test_headline_is_the_first_ldmkit_point_with_both_qualities():
    P = ttq.Point
    peer = [P(50.0, 100, "a", 0.3, 2.0), P(100.0, 200, "b", 0.5, 1.0)]
    ldmkit = [P(20.0, 10, "c", 0.6, 1.5), P(40.0, 20, "d", 0.4, 0.9), P(60.0, 30, "e", 0.5, 1.0)]
    # adherence alone at 20 s, FD alone at 40 s: both first at 60 s
    assert ttq.headline({"peer": peer, "ldmkit": ldmkit}) == "0.60"
    assert ttq.headline({"peer": peer, "ldmkit": ldmkit[:2]}) == "not reached"
    # a peer that gets worse: its best point (lowest FD) is its first, which ldmkit reaches later or never
    worse = [P(50.0, 100, "a", 0.5, 0.8), P(100.0, 200, "b", 0.1, 3.0)]
    assert ttq.best_point(worse) is worse[0]
    assert ttq.headline({"peer": worse, "ldmkit": ldmkit}) == "0.20"  # the final point: reached at once
    assert ttq.headline({"peer": worse, "ldmkit": ldmkit}, worse[0]) == "not reached"  # adherence 0.5, FD 0.8
    assert ttq.headline({"peer": worse, "ldmkit": [*ldmkit, P(70.0, 40, "h", 0.5, 0.8)]}, worse[0]) == "1.40"
    # medians over rounds, point by point, as long as the shortest round
    curve = ttq.median_curve([ldmkit, [P(30.0, 12, "f", 0.2, 1.0), P(50.0, 22, "g", 0.8, 0.7)]])
    got = [x for p in curve for x in (p.seconds, p.step, p.adherence, p.fd)]
    assert got == pytest.approx([25.0, 11, 0.4, 1.25, 45.0, 21, 0.6, 0.8])


def fake_peer_run(out: Path, launched: float, lora_file: Path) -> None:
    """What the peer leaves: TensorBoard 'loss' scalars every step (2 s apart, +1 s at its checkpoint steps 4
    and 8, which it logs after saving) and checkpoint-N/unet_lora with its peft-wrapper key names."""
    from safetensors.torch import load_file, save_file
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "logs" / "lcm-lora"))
    t = launched + 8.0
    for step in range(1, 9):
        t += 2.0 + (1.0 if step in (4, 8) else 0.0)
        writer.add_scalar("loss", 1.0 / step, step, walltime=t)
    writer.close()
    state = load_file(str(lora_file))
    assert all(k.startswith("unet.") for k in state)
    for step in (4, 8):
        folder = out / f"checkpoint-{step}" / "unet_lora"
        folder.mkdir(parents=True)
        wrapped = {ttq.PEFT_WRAPPER + k.removeprefix("unet."): v for k, v in state.items()}
        save_file(wrapped, str(folder / "pytorch_lora_weights.safetensors"))


def test_toy_chain_ldmkit_side_and_report(tmp_path, tiny_sd15, shapes_folder, capsys):
    args = argparse.Namespace(
        shards=str(shapes_folder),
        reference=str(shapes_folder),
        threads=1,
        precision="no",
        ldmkit_set=[],
        eval_steps=4,
        work=tmp_path,
    )
    size = dataclasses.replace(ttq.TOY, batch=2, rank=4, ldmkit_steps=3, save_every=1e-3, eval_images=4)
    points = ttq.ldmkit_run(args, size, tiny_sd15, 0, tmp_path / "ldmkit-r0")
    # a LoRA at every step (each passes a 1 ms mark), on one clock that only moves forward
    assert [p.step for p in points] == [1, 2, 3]
    assert all(0 < a.seconds < b.seconds for a, b in zip(points, points[1:]))
    for p in points:
        assert (Path(p.lora) / "pytorch_lora_weights.safetensors").is_file()
        assert (Path(p.lora) / "ldmkit_sampling.json").is_file()

    peer_out = tmp_path / "peer-r0"
    fake_peer_run(peer_out, 1000.0, Path(points[-1].lora) / "pytorch_lora_weights.safetensors")
    peer = ttq.peer_points(peer_out, 1000.0)
    # step 4 logged at 1000 + 8 + 4 * 2 + 1; its save (1 s over the 2 s median step) is not training
    assert [(p.step, p.seconds) for p in peer] == [(4, 16.0), (8, 24.0)]

    ttq.evaluate_points(args, size, tiny_sd15, "peer", peer)
    ttq.evaluate_points(args, size, tiny_sd15, "ldmkit", points)
    for p in peer + points:
        assert 0.0 <= p.adherence <= 1.0 and p.fd is not None and p.fd >= 0
    # the peer's last LoRA is ldmkit's last one under the wrapper's names: loaded right, it samples the same
    assert peer[-1].fd == pytest.approx(points[-1].fd, rel=1e-4)

    curves = {t: ttq.median_curve([ps]) for t, ps in (("peer", peer), ("ldmkit", points))}
    capsys.readouterr()
    ttq.report(curves, 1, tmp_path / "plot.png", {"steps": 0, "adherence_50": 0.0, "fd_50": None})
    lines = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert sum(line.startswith("  peer") for line in lines) == 2
    assert sum(line.startswith("  ldmkit") for line in lines) == 3
    assert (tmp_path / "plot.png").is_file()

    # --reevaluate: the same LoRAs scored again after the teacher's decoder changed; cached per decoder
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd15, teacher)
    runs = tmp_path / "run"
    runs.mkdir()
    capsys.readouterr()
    ttq.finish(args, size, tiny_sd15, runs, {"peer": [peer], "ldmkit": [points]}, {"steps": 0, "adherence_50": 0.0}, "")
    # the teacher without a LoRA at the same steps, each solver, and when each tool first beats the best one
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("the teacher without a LoRA at 4 steps") and "unipc" in line for line in lines)
    assert sum(" beats the teacher's best 4-step solver " in line for line in lines) == 2
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(teacher / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a brighter decoder: the same latents, other images
    vae.save_pretrained(teacher / "vae")
    old, new = ttq.teacher_tag(tiny_sd15), ttq.teacher_tag(teacher)
    assert old != new
    args.reevaluate = runs
    capsys.readouterr()
    assert ttq.reevaluate(args, size, teacher, {"steps": 0, "adherence_50": 0.0}) == 0
    assert LAST_LINE.match(capsys.readouterr().out.strip().splitlines()[-1])
    again = json.loads((runs / f"rounds-{new}-4steps.json").read_text())["ldmkit"][0]
    assert [p["lora"] for p in again] == [p.lora for p in points]
    assert all(p["fd"] != q.fd for p, q in zip(again, points))  # not the cached figures of the old decoder
    for p in points:
        for tag in (old, new):
            assert (Path(p.lora).parent / ttq.eval_folder(tag, 4, Path(p.lora).name) / "metrics.json").is_file()
    assert (runs / f"time_to_quality-{new}-4steps.png").is_file()

    # --eval-steps: the same LoRAs at 1 step, cached apart from the 4-step figures
    args.eval_steps = 1
    assert ttq.reevaluate(args, size, teacher, {"steps": 0, "adherence_50": 0.0}) == 0
    one = json.loads((runs / f"rounds-{new}-1steps.json").read_text())["ldmkit"][0]
    assert all(p["fd"] != q["fd"] for p, q in zip(one, again))
    metrics = json.loads(
        (Path(points[0].lora).parent / ttq.eval_folder(new, 1, Path(points[0].lora).name) / "metrics.json").read_text()
    )
    assert [s["steps"] for s in metrics["settings"]] == [1]
