"""Time to quality: how soon ldmkit's LCM-LoRA reaches the quality of diffusers' LCM-LoRA script (issue 26).

    python benchmarks/time_to_quality.py DIFFUSERS [--rounds 3] [--peer-python PY] [--work FOLDER]
    python benchmarks/time_to_quality.py DIFFUSERS --toy          # the whole chain at toy size, minutes

DIFFUSERS: a diffusers checkout, its bare git directory, or the peer script
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` itself (vs_diffusers.py reads it and
applies its one webdataset 1.x fix to a temporary copy). ``--peer-python``: the Python that runs the peer
(one with torch, torchvision, diffusers, peft, accelerate, webdataset, braceexpand, tensorboard); default
this one. ldmkit always runs with this Python.

1. The teacher (built once, cached in ``--work``): an SD1.5-layout pipeline (small widths: the UNet of
   benchmarks/lcm_throughput.py, a KL-f8 VAE trained by ldmkit's ``vae`` recipe on the data and then its decoder
   alone, the quickstart's frozen random word-level CLIP text encoder) whose UNet ldmkit's ``finetune`` trains
   from random weights on ``ldmkit data synth`` shapes (10% empty captions, so guidance works), in chunks, until
   its guided 50-step DDIM adherence is >= 0.8 (``--teacher-threshold``; ``--toy``: tiny, a few steps, no
   threshold). Its record also has the adherence of the VAE's reconstructions of the
   data, which no teacher decoded by that VAE can exceed. Both tools load it: the peer takes only SD folders
   (the copy pads its unconditional prompt to the tokenizer's length, not a literal 77: ``pad_to_tokenizer``).
2. Distillation, one process at a time, one after the other, ``--threads`` torch threads each, the same
   WebDataset shards, resolution, batch, LoRA rank (alpha = rank), seed (= the round) and precision:
   - the peer with its own defaults otherwise (learning rate, warm-up, w range, L2 loss, ...; its
     validation off), checkpointing every ``--peer-checkpoint-every`` steps; each checkpoint's time is
     read from its own step log (the TensorBoard events it writes by default), minus the time its
     checkpoint saves took (a checkpoint step's excess over the median step);
   - ldmkit with its recipe for a small shapes teacher (configs/lcm_lora/quickstart.yaml, the family and
     sizes set for this teacher; ``--ldmkit-set section.key=value`` to change it), its LoRA exported every
     ``--save-every`` seconds of training time (``train.save_every_seconds``), on the same clock, saves
     excluded.
   Times are seconds from the process's launch (imports, model loading and data caching included: what a
   user waits), on each tool's own log.
3. Every saved LoRA is evaluated by ldmkit's evaluator (``ldmkit evaluate``: ``--eval-steps``, 4 by default,
   held-out shapes prompts, the same seeds; adherence and FD to the data): the peer's LoRA as diffusers samples
   it (LCMScheduler, guidance 1.0: its validation's), ldmkit's as its export's sampling record says. The
   teacher without a LoRA is evaluated at the same steps with DDIM, DPM-Solver++ and UniPC (guided as it is
   judged): the training-free baseline, which a LoRA must beat for distillation to have done anything.
   ``--reevaluate RUN`` scores a finished run's LoRAs again with the current teacher (evaluations are cached
   per LoRA and per teacher decoder).
4. A table and a plot (ldmkit's Pillow charts, eval/plot.py) of quality against time, medians over rounds, and the
   last line: the fraction of the peer's time at which ldmkit's median curve first reaches the peer's
   final median adherence AND FD.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
RECIPES = SRC / "ldmkit" / "recipes"
EVAL_STEPS = 4  # the issue's; --eval-steps 1 or 2 where this teacher fails without distillation
TEACHER_SOLVERS = ("ddim", "dpm", "unipc")  # the training-free baseline at --eval-steps (ldmkit evaluate's)
TEACHER_GUIDANCE = 3.0  # diffusers' scale; LCM's w = scale - 1 = 2.0, the quickstart recipe's w_min = w_max
PEER_GUIDANCE = 1.0  # the peer's LoRA has w baked in: its log_validation samples at guidance_scale=1.0
NEVER = 10**9  # a step cadence that never comes (the peer's validation)


@dataclass
class Size:
    """Everything that scales with --toy."""

    resolution: int = 64
    num_images: int = 2000
    vae_steps: int = 2000
    decoder_steps: int = 1000  # the decoder alone, after the VAE (see build_teacher)
    teacher_chunk: int = 1000  # finetune steps between adherence checks
    teacher_max_steps: int = 10000
    teacher_threshold: float | None = 0.8
    teacher_batch: int = 32
    teacher_eval_images: int = 64
    batch: int = 16
    rank: int = 32
    peer_steps: int = 600
    peer_checkpoint_every: int = 100
    # about the peer's wall-clock span (its 600 uncached steps take as long as ~800 of ldmkit's cached ones on
    # this CPU); the recipe's cosine decay ends at max_steps, as it would for a user who asks for this length
    ldmkit_steps: int = 800
    save_every: float = 60.0
    eval_images: int = 64


TOY = Size(
    resolution=32,
    num_images=64,
    vae_steps=10,
    decoder_steps=4,
    teacher_chunk=10,
    teacher_max_steps=10,
    teacher_threshold=None,
    teacher_batch=8,
    teacher_eval_images=8,
    batch=4,
    rank=4,
    peer_steps=6,
    peer_checkpoint_every=3,
    ldmkit_steps=20,
    save_every=0.3,  # toy steps take tens of ms: several marks whatever the machine
    eval_images=8,
)


# ---- helpers ---------------------------------------------------------------------------------------
def env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(cmd: list[str], log: Path, threads: int, python: str = sys.executable) -> float:
    """One process, its output to ``log``; returns the Unix time it was launched. Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    launched = time.time()
    with log.open("w") as f:
        r = subprocess.run([python, *cmd], env=env(threads), stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {r.returncode}); log {log}:\n{tail}")
    return launched


def ldmkit(*args: str) -> list[str]:
    return ["-m", "ldmkit", *args]


def evaluate(model: Path, out: Path, args, lora: Path | None = None, **how) -> tuple[float, float | None]:
    """(adherence, FD to the data) of ``model`` (+ ``lora``) by ``ldmkit evaluate`` on held-out shapes
    prompts; cached in ``out``. ``how``: steps, scheduler, guidance (None: the export's own)."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        cmd = ["evaluate", "--model", str(model), "--shapes", "--reference", args.reference, "--out", str(out)]
        cmd += ["--steps", str(how.get("steps", args.eval_steps)), "--num-images", str(how["images"]), "--seed", "0"]
        cmd += ["--no-caption-adherence", "--overwrite", "--device", "cpu", "--dtype", "fp32"]
        if lora is not None:
            cmd += ["--lora", str(lora)]
        for key in ("scheduler", "guidance"):
            if how.get(key) is not None:
                cmd += [f"--{key}", str(how[key])]
        # in this process (no timing here): one import of torch and diffusers for every evaluation
        from ldmkit.cli import main as ldmkit_main

        if ldmkit_main(cmd) != 0:
            raise SystemExit(f"ldmkit evaluate {' '.join(cmd[1:])} failed")
    m = json.loads(metrics.read_text())
    setting = m["settings"][0]
    return float(setting["adherence"]["all"]), setting.get("fd")  # all four attributes right


# ---- 1. data and teacher -----------------------------------------------------------------------------
def build_data(args, size: Size) -> tuple[str, str]:
    """The training data as WebDataset shards (a brace pattern: both tools read them) and the same samples
    as an image folder (the FD reference: ``ldmkit evaluate --reference`` takes a folder)."""
    sys.path.insert(0, str(HERE))
    from vs_diffusers import write_shards

    from ldmkit.data.synth import write_dataset

    name = f"shapes-{size.resolution}-{size.num_images}"
    shards = write_shards(args.work / name, size.num_images, size.resolution)
    folder = args.work / f"{name}-folder"
    if not (folder / "metadata.jsonl").is_file():
        write_dataset(folder, num=size.num_images, fmt="folder", size=size.resolution, seed=0)
    return shards, str(folder)


def build_base(args, size: Size, vae_export: Path) -> Path:
    """The random SD1.5-layout pipeline the teacher starts from, with the trained VAE."""
    base = args.work / "teacher-base"
    if (base / "model_index.json").is_file():
        return base
    tmp = args.work / "teacher-base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.toy:
        from ldmkit.models.tiny import build_tiny_pipeline

        build_tiny_pipeline("sd15", tmp)
    else:
        from lcm_throughput import build_model

        build_model(tmp)
        write_word_text_encoder(tmp, args.reference)
    shutil.rmtree(tmp / "vae")
    shutil.copytree(vae_export, tmp / "vae", ignore=shutil.ignore_patterns("ldmkit_*", "*.md", "*.png"))
    unet_cfg = tmp / "unet" / "config.json"
    cfg = json.loads(unet_cfg.read_text())
    cfg["sample_size"] = size.resolution // 8  # the trained VAE is f8
    unet_cfg.write_text(json.dumps(cfg, indent=2))
    tmp.rename(base)
    return base


def write_word_text_encoder(base: Path, data: str) -> None:
    """Replace the base's byte-level text encoder by the quickstart's word-level one for these captions
    (``text_encoder_plan``: each caption word one token, 2 random frozen CLIP layers, width 64 as the UNet's
    cross-attention). With bytes, "red" is three tokens mixed by 4 random layers: measured, the teacher's
    colour accuracy crawled from 0.41 to 0.47 over finetune steps 1000-4000 (shape 0.91, position 1.00 by
    then), so adherence stopped near 0.42. Both tools read the folder (vocab.json and merges.txt too)."""
    from ldmkit.models.text import write_text_components
    from ldmkit.quickstart.stages import _captions, text_encoder_plan

    captions = _captions(Path(data))
    shape, _ = text_encoder_plan(captions)
    with tempfile.TemporaryDirectory() as tmp:
        write_text_components(tmp, captions, hidden_size=64, seed=0, **shape)
        for part in ("tokenizer", "text_encoder"):  # not its model_index.json: the base stays an SD pipeline
            shutil.rmtree(base / part)
            shutil.copytree(Path(tmp) / part, base / part)


def build_teacher(args, size: Size) -> tuple[Path, dict]:
    """The cached teacher export and its record (adherence, steps); built in chunks until the threshold."""
    record_file = args.work / "teacher.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        return Path(record["export"]), record
    vae_out = args.work / "vae"
    data = [f"--data.path={args.shards}", f"--data.resolution={size.resolution}", "--data.random_flip=false"]
    data += ["--data.num_workers=1", "--train.report_to=none"]
    vae = [*data, f"--output_dir={vae_out}", f"--train.max_steps={size.vae_steps}"]
    # vae/shapes.yaml: SD's latent layout (KL-f8, 4 channels), which the SD1.5-layout UNet takes
    if not (vae_out / "export" / "config.json").is_file():
        print(f"teacher: training the VAE ({size.vae_steps} steps) ...", file=sys.stderr, flush=True)
        run(
            ldmkit("train", str(RECIPES / "vae" / "shapes.yaml"), "--method.name=vae", *vae),
            vae_out / "train.log",
            args.threads,
        )
    # Then its decoder alone, with L2 (sd-vae-ft-mse's recipe; the latents stay): measured, the 2000-step
    # VAE turned red into orange (a red core (215, 39, 39) came back as (194, 154, 36)), so its
    # reconstructions of the data scored colour 0.83 and adherence 0.78, a ceiling under the 0.8;
    # 1000 decoder steps fix that without touching the encoder the teacher's latents come from.
    decoder_out = args.work / "vae-decoder"
    if not (decoder_out / "export" / "config.json").is_file():
        print(f"teacher: fine-tuning the VAE's decoder ({size.decoder_steps} steps) ...", file=sys.stderr, flush=True)
        decoder = [*data, f"--output_dir={decoder_out}", f"--train.max_steps={size.decoder_steps}"]
        decoder += [f"--model.vae={vae_out / 'export'}", "--method.train_encoder=false", "--method.loss=l2"]
        decoder += ["--train.learning_rate=5e-4"]
        run(
            ldmkit("train", str(RECIPES / "vae" / "shapes.yaml"), "--method.name=vae", *decoder),
            decoder_out / "train.log",
            args.threads,
        )
    base = build_base(args, size, decoder_out / "export")
    out = args.work / "teacher"
    common = [
        "--method.name=finetune",
        "--method.use_ema=true",
        "--method.ema_decay=0.999",
        f"--model.pretrained={base}",
        f"--data.path={args.shards}",
        f"--data.resolution={size.resolution}",
        "--data.random_flip=false",  # flips move "left" shapes to the right: captions would lie
        # Classifier-free guidance needs an unconditional model: 10% empty captions, as SD was trained (the
        # recipe's 0.0 suits fine-tuning a model that has one). Measured without: the 4000-step teacher
        # scored 0.953 unguided at 50 DDIM steps but 0.609 / 0.469 / 0.281 at guidance 2 / 3 / 7.5 (its
        # "" prediction is noise that guidance amplifies), and both tools distilled that guided teacher.
        "--data.proportion_empty_prompts=0.1",
        "--data.cache=true",
        "--data.num_workers=1",
        f"--train.batch_size={size.teacher_batch}",
        "--train.learning_rate=3e-4",
        "--train.lr_warmup_steps=0",
        "--train.validate_every=0",
        f"--train.checkpoint_every={size.teacher_chunk}",
        "--train.checkpoints_total_limit=1",
        "--train.report_to=none",
        f"--output_dir={out}",
    ]
    threshold = size.teacher_threshold if args.teacher_threshold is None else args.teacher_threshold
    steps, adherence, fd = 0, 0.0, None
    # The step of the export on disk: a re-run skips the chunks before it. (The latest checkpoint does not say:
    # a stopped run checkpoints where it stopped, after the export it wrote.)
    marker = out / "export_step"
    exported = int(marker.read_text()) if marker.is_file() else 0
    while steps < size.teacher_max_steps:
        steps += size.teacher_chunk
        if exported > steps:
            continue
        if exported < steps:  # the loop resumes the chunk from its checkpoint after a stop
            print(f"teacher: finetune to step {steps} ...", file=sys.stderr, flush=True)
            recipe = str(RECIPES / "finetune" / "debug.yaml")
            run(
                ldmkit("train", recipe, *common, f"--train.max_steps={steps}"), out / f"train-{steps}.log", args.threads
            )
            exported = steps
            marker.write_text(str(steps))
        adherence, fd = evaluate(
            out / "export",
            args.work / "teacher-eval" / f"{teacher_tag(out / 'export')}-step-{steps}",
            args,
            steps=50,
            scheduler="ddim",
            guidance=TEACHER_GUIDANCE,
            images=size.teacher_eval_images,
        )
        print(f"teacher: step {steps}: guided 50-step adherence {adherence:.3f}", file=sys.stderr, flush=True)
        if threshold is None or adherence >= threshold:
            break
    if threshold is not None and adherence < threshold:
        raise SystemExit(f"the teacher reached adherence {adherence:.3f} < {threshold} in {steps} steps")
    record = {"export": str(out / "export"), "steps": steps, "adherence_50": adherence, "fd_50": fd}
    record["vae_adherence"] = vae_ceiling(out / "export" / "vae", args.reference, size.teacher_eval_images)
    record_file.write_text(json.dumps(record, indent=2))
    return out / "export", record


def vae_ceiling(vae_export: Path, reference: str, n: int) -> float:
    """Adherence of the VAE's reconstructions of the first ``n`` data images: no teacher sampling through this
    decoder can score above it (measured on 64 images: the 2000-step VAE 0.78, colour 0.83; its decoder
    fine-tuned 1000 steps: see build_teacher)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from ldmkit.eval.scorer import adherence

    files = sorted(Path(reference).glob("*.png"))[:n]
    prompts = [f.with_suffix(".txt").read_text().strip() for f in files]
    x = torch.tensor(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(vae_export)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return adherence(list(y), prompts)["all"]


# The peer pads its unconditional prompt to a literal 77 tokens (CLIP's length: the same as
# tokenizer.model_max_length for every SD model); the teacher's text encoder has 32 positions. The copy pads to
# the tokenizer's length, as its prompts are: a no-op on SD itself.
PEER_UNCOND_FROM = 'padding="max_length", max_length=77'
PEER_UNCOND_TO = 'padding="max_length", max_length=tokenizer.model_max_length'


def pad_to_tokenizer(script: Path) -> None:
    text = script.read_text()
    if text.count(PEER_UNCOND_FROM) != 1:
        raise SystemExit("the lcm_lora peer changed: its unconditional tokenisation was not found once")
    script.write_text(text.replace(PEER_UNCOND_FROM, PEER_UNCOND_TO))


# ---- 2. distillation ---------------------------------------------------------------------------------
@dataclass
class Point:
    """One saved LoRA: its time on the tool's clock, step, where it is, and (after evaluation) its quality."""

    seconds: float
    step: int
    lora: str
    adherence: float | None = None
    fd: float | None = None


def peer_run(args, size: Size, teacher: Path, script: Path, seed: int, out: Path) -> list[Point]:
    """diffusers' LCM-LoRA script; its checkpoints on the clock of its TensorBoard step log."""
    if not (out / "points.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            str(script),
            f"--pretrained_teacher_model={teacher}",
            f"--output_dir={out}",
            f"--train_shards_path_or_url={args.shards}",
            f"--resolution={size.resolution}",
            f"--train_batch_size={size.batch}",
            f"--lora_rank={size.rank}",
            f"--lora_alpha={size.rank}",
            f"--seed={seed}",
            f"--mixed_precision={args.precision}",
            f"--max_train_steps={size.peer_steps}",
            f"--max_train_samples={size.num_images}",
            f"--checkpointing_steps={size.peer_checkpoint_every}",
            f"--validation_steps={NEVER}",  # validation is not training (ldmkit's is off too)
            "--dataloader_num_workers=1",  # 0 divides by zero in its dataset sizing
            "--report_to=tensorboard",  # its default, spelled out: its step log
        ]
        launched = run(cmd, out.with_suffix(".log"), args.threads, python=args.peer_python)
        points = peer_points(out, launched)
        (out / "points.json").write_text(json.dumps([p.__dict__ for p in points], indent=2))
    return [Point(**p) for p in json.loads((out / "points.json").read_text())]


def read_step_log(out: Path) -> dict[int, float]:
    """{step: Unix time} of the peer's logged steps (TensorBoard scalars it logs every optimizer step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stamps: dict[int, float] = {}
    for events in sorted(out.glob("logs/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            stamps.update({e.step: e.wall_time for e in acc.Scalars("loss")})
    if not stamps:
        raise SystemExit(f"no step log (TensorBoard 'loss' scalars) under {out / 'logs'}")
    return stamps


def peer_points(out: Path, launched: float) -> list[Point]:
    stamps = read_step_log(out)
    steps = sorted(stamps)
    intervals = {s: stamps[s] - stamps[p] for p, s in zip(steps, steps[1:])}
    typical = statistics.median(intervals.values()) if intervals else 0.0
    points, saves = [], 0.0
    for ckpt in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        # the step is logged after its checkpoint is saved: that save's excess over a typical step is not training
        saves += max(0.0, intervals.get(step, typical) - typical)
        points.append(Point(stamps[step] - launched - saves, step, str(loadable_peer_lora(ckpt / "unet_lora"))))
    return points


PEFT_WRAPPER = "unet.base_model.model."


def loadable_peer_lora(folder: Path) -> Path:
    """The peer's LoRA as stock ``load_lora_weights`` reads it. Its save hook takes the state dict of the peft
    wrapper (``get_peft_model(unet)``), so with current peft every key reads ``unet.base_model.model.<module>``
    and diffusers finds no such module; the same tensors under ``unet.<module>`` (nothing else changed)."""
    from safetensors.torch import load_file, save_file

    name = "pytorch_lora_weights.safetensors"
    state = load_file(str(folder / name))
    if not any(k.startswith(PEFT_WRAPPER) for k in state):
        return folder
    out = folder.with_name(folder.name + "_loadable")
    out.mkdir(exist_ok=True)
    save_file({"unet." + k.removeprefix(PEFT_WRAPPER): v for k, v in state.items()}, str(out / name))
    return out


def ldmkit_run(args, size: Size, teacher: Path, seed: int, out: Path) -> list[Point]:
    """ldmkit's lcm_lora with its recipe for a small shapes teacher; its LoRA exported on its training clock."""
    if not (out / "points.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            "train",
            str(RECIPES / "lcm_lora" / "quickstart.yaml"),
            "--method.name=lcm_lora",
            "--model.family=sd",
            f"--model.pretrained={teacher}",
            f"--data.path={args.shards}",
            f"--data.resolution={size.resolution}",
            f"--data.cache_dir={out / 'cache'}",  # built in the run: its time counts
            f"--train.batch_size={size.batch}",
            f"--method.lora_rank={size.rank}",
            f"--method.lora_alpha={size.rank}",
            f"--train.seed={seed}",
            f"--train.mixed_precision={args.precision}",
            f"--train.max_steps={size.ldmkit_steps}",
            f"--train.save_every_seconds={size.save_every}",
            "--train.validate_every=0",
            "--train.checkpoint_every=0",
            f"--output_dir={out}",
            *[f"--{o}" for o in args.ldmkit_set],
        ]
        launched = run(ldmkit(*cmd), out.with_suffix(".log"), args.threads)
        points = ldmkit_points(out, launched)
        (out / "points.json").write_text(json.dumps([p.__dict__ for p in points], indent=2))
    return [Point(**p) for p in json.loads((out / "points.json").read_text())]


def ldmkit_points(out: Path, launched: float) -> list[Point]:
    index = out / "timed" / "index.jsonl"
    if not index.is_file():
        raise SystemExit(f"ldmkit saved no LoRA at a time mark ({index}): lower --save-every")
    points = []
    for line in index.read_text().splitlines():
        r = json.loads(line)
        points.append(
            Point(r["unix_time"] - launched - r["save_seconds_before"], r["step"], str(out / "timed" / r["folder"]))
        )
    return points


# ---- 3. evaluation -----------------------------------------------------------------------------------
def teacher_tag(teacher: Path) -> str:
    """A short hash of the teacher's VAE weights: evaluations are cached per LoRA and per decoder, so a run
    re-scored after the teacher's decoder changed (``--reevaluate``) never reads a stale figure. (The UNet
    needs no tag: a LoRA is trained on one teacher UNet, and the teacher's chunks are told apart by step.)"""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted((teacher / "vae").glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:8]


def eval_folder(tag: str, steps: int, name: str) -> str:
    """Where one LoRA's evaluation is cached: per teacher decoder (``tag``) and per step count."""
    return f"eval-{tag}-{steps}steps-{name}"


def teacher_baseline(args, size: Size, teacher: Path) -> dict[str, tuple[float, float | None]]:
    """The teacher without any LoRA at ``--eval-steps``, guided as it is judged, with each training-free solver
    of ``ldmkit evaluate --teacher-solvers``: what a user gets at that step count without distilling. Where it
    is already as good as the LoRAs, the curves say nothing about distillation (measured: at 4 steps guided
    DDIM scores 0.953 / 0.118 on this teacher; at 1 step 0.000 / 1.754)."""
    tag = teacher_tag(teacher)
    return {
        solver: evaluate(
            teacher,
            args.work / "teacher-eval" / f"{tag}-{solver}-{args.eval_steps}steps",
            args,
            scheduler=solver,
            guidance=TEACHER_GUIDANCE,
            images=size.eval_images,
        )
        for solver in TEACHER_SOLVERS
    }


def evaluate_points(args, size: Size, teacher: Path, tool: str, points: list[Point]) -> None:
    tag = teacher_tag(teacher)
    for p in points:
        how = {"scheduler": "lcm", "guidance": PEER_GUIDANCE} if tool == "peer" else {}
        # ldmkit's LoRA folder carries its sampling record (scheduler, guidance): evaluate reads it
        p.adherence, p.fd = evaluate(
            teacher,
            Path(p.lora).parent / eval_folder(tag, args.eval_steps, Path(p.lora).name),
            args,
            Path(p.lora),
            images=size.eval_images,
            **how,
        )


# ---- 4. the table, the plot and the headline ---------------------------------------------------------
def median_curve(rounds: list[list[Point]]) -> list[Point]:
    """Point i of every round (the peer's i-th checkpoint step, ldmkit's i-th time mark), medians over rounds;
    as many points as the shortest round has."""
    n = min(len(r) for r in rounds)
    curve = []
    for i in range(n):
        at = [r[i] for r in rounds]
        fds = [p.fd for p in at if p.fd is not None]
        curve.append(
            Point(
                statistics.median(p.seconds for p in at),
                int(statistics.median(p.step for p in at)),
                at[0].lora,
                statistics.median(p.adherence for p in at),
                statistics.median(fds) if fds else None,
            )
        )
    return curve


def headline(curves: dict[str, list[Point]], target: Point | None = None) -> str:
    """The fraction of the peer's time (to ``target``, default its final point) at which ldmkit's curve first
    has the target's adherence and FD."""
    final = curves["peer"][-1] if target is None else target
    for p in curves["ldmkit"]:
        if better(p, final):
            return f"{p.seconds / final.seconds:.2f}"
    return "not reached"


def best_point(curve: list[Point]) -> Point:
    """The peer's best saved LoRA: the lowest FD to the data (the highest adherence among equal FDs). Its
    final one need not be: with its defaults (guidance w drawn from [5, 15], no decay) it can get worse."""
    return min(curve, key=lambda p: (float("inf") if p.fd is None else p.fd, -p.adherence))


def print_table(curves: dict[str, list[Point]], rounds: int, steps: int) -> None:
    print(
        f"\nquality against training time ({steps} steps; median of {rounds} round(s); time from launch, saves excluded)"
    )
    print(f"  {'tool':7} {'seconds':>8} {'step':>6} {'adherence':>9} {'FD':>8}")
    for tool, curve in curves.items():
        for p in curve:
            fd = f"{p.fd:8.4f}" if p.fd is not None else f"{'-':>8}"
            print(f"  {tool:7} {p.seconds:8.1f} {p.step:6d} {p.adherence:9.3f} {fd}")


def plot(curves: dict[str, list[Point]], path: Path, steps: int, baseline: Point | None = None) -> None:
    """Adherence and FD against seconds, both tools, and the teacher's best solver without a LoRA as a flat
    line (ldmkit's Pillow charts: matplotlib is no dependency)."""
    from PIL import Image

    from ldmkit.eval.plot import line_chart

    curves = dict(curves)
    if baseline is not None:
        span = [p.seconds for c in curves.values() for p in c]
        curves[f"teacher {baseline.lora}"] = [dataclasses.replace(baseline, seconds=t) for t in (min(span), max(span))]
    panels = [
        line_chart(
            {t: [(p.seconds, p.adherence) for p in c] for t, c in curves.items()},
            f"adherence at {steps} steps",
            y_range=(0.0, 1.0),
            x_label="seconds from launch",
            log_x=False,
        ),
        line_chart(
            {t: [(p.seconds, p.fd) for p in c if p.fd is not None] for t, c in curves.items()},
            f"FD to the data at {steps} steps",
            x_label="seconds from launch",
            log_x=False,
        ),
    ]
    img = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        img.paste(p, (x, 0))
        x += p.width
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def better(p: Point, than: Point) -> bool:
    """Both figures at least as good: adherence and FD (where both have one)."""
    fd_ok = than.fd is None or (p.fd is not None and p.fd <= than.fd)
    return p.adherence >= than.adherence and fd_ok


def report(
    curves: dict[str, list[Point]],
    rounds: int,
    plot_path: Path,
    teacher: dict,
    steps: int = EVAL_STEPS,
    baseline: dict[str, tuple[float, float | None]] | None = None,
) -> None:
    """The table, the plot and the headline; with ``baseline`` (teacher_baseline's figures) also the teacher's
    solvers at these steps and when each tool's curve first beats the best of them."""
    fd = teacher.get("fd_50")
    print(
        f"\nteacher: {teacher['steps']} finetune steps, guided 50-step DDIM adherence {teacher['adherence_50']:.3f}"
        + (f", FD {fd:.4f}" if fd is not None else "")
        + (f" (its VAE's reconstructions: {teacher['vae_adherence']:.3f})" if "vae_adherence" in teacher else "")
    )
    print_table(curves, rounds, steps)
    best_solver = None
    if baseline:
        figures = ", ".join(f"{k} {a:.3f} / {'-' if f is None else f'{f:.4f}'}" for k, (a, f) in baseline.items())
        print(f"the teacher without a LoRA at {steps} steps, guidance {TEACHER_GUIDANCE} (adherence / FD): {figures}")
        best_solver = best_point([Point(0.0, 0, k, a, f) for k, (a, f) in baseline.items()])
        for tool, curve in curves.items():
            first = next((p for p in curve if better(p, best_solver)), None)
            when = "never" if first is None else f"from {first.seconds:.0f} s (step {first.step})"
            print(f"  {tool} beats the teacher's best {steps}-step solver ({best_solver.lora}): {when}")
    plot(curves, plot_path, steps, best_solver)
    print(f"plot: {plot_path}")
    best = best_point(curves["peer"])
    if best is not curves["peer"][-1]:
        print(
            f"the peer's best quality (step {best.step}, {best.seconds:.0f} s: adherence {best.adherence:.3f}, FD "
            f"{best.fd:.4f}): ldmkit reaches it in {headline(curves, best)} of the peer's time to it"
        )
    print(f"time-to-quality: ldmkit reaches the peer's final quality in {headline(curves)} of its time")


# ---- the benchmark -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("diffusers", help="diffusers checkout, its bare git directory, or the peer script.")
    p.add_argument("--toy", action="store_true", help="Tiny teacher, a few steps each: the chain in minutes.")
    p.add_argument(
        "--rounds", type=int, default=3, help="Rounds (seed = round); medians are reported; 0 builds the teacher only."
    )
    p.add_argument(
        "--teacher-threshold", type=float, default=None, help="The teacher's guided 50-step adherence to reach (0.8)."
    )
    p.add_argument("--peer-python", default=sys.executable, help="Python that runs the peer script.")
    p.add_argument("--work", default=None, help="Work folder (teacher cached there); default ./time_to_quality[-toy].")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process.")
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"), help="Both tools' mixed precision.")
    p.add_argument("--save-every", type=float, default=None, help="ldmkit's export cadence, training seconds.")
    p.add_argument("--peer-steps", type=int, default=None, help="The peer's max_train_steps.")
    p.add_argument("--peer-checkpoint-every", type=int, default=None, help="The peer's checkpointing_steps.")
    p.add_argument("--ldmkit-steps", type=int, default=None, help="ldmkit's train.max_steps.")
    p.add_argument(
        "--ldmkit-set", action="append", default=[], help="More ldmkit overrides, section.key=value (repeatable)."
    )
    p.add_argument(
        "--reevaluate",
        type=Path,
        default=None,
        help="A finished run folder (work/runs/STAMP): score its saved LoRAs again with the current teacher "
        "(e.g. after its decoder changed: LoRAs are trained on latents, the decoder only shows them), no training.",
    )
    p.add_argument(
        "--eval-steps",
        type=int,
        default=EVAL_STEPS,
        help="Sampling steps of every evaluation (4, the issue's; 1 or 2 where the teacher alone fails). "
        "With --reevaluate: a finished run's LoRAs scored at another step count.",
    )
    p.add_argument("--tools", default="peer,ldmkit", help=argparse.SUPPRESS)  # tests: ldmkit only
    args = p.parse_args(argv)
    if shutil.which(args.peer_python) is None:
        p.error(f"--peer-python {args.peer_python}: no such Python")
    if args.eval_steps < 1:
        p.error(f"--eval-steps {args.eval_steps}: at least 1")
    if args.reevaluate is not None and not (args.reevaluate / "rounds.json").is_file():
        p.error(f"--reevaluate {args.reevaluate}: no rounds.json (not a finished run folder)")
    size = dataclasses.replace(TOY if args.toy else Size())
    for key in ("save_every", "peer_steps", "peer_checkpoint_every", "ldmkit_steps"):
        if getattr(args, key) is not None:
            setattr(size, key, getattr(args, key))
    args.work = Path(args.work or f"time_to_quality{'-toy' if args.toy else ''}").resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    tools = args.tools.split(",")

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ldmkit-ttq-peer-") as tmp:
        return benchmark(args, size, tools, Path(tmp))


def benchmark(args, size: Size, tools: list[str], tmp: Path) -> int:
    sys.path.insert(0, str(HERE))
    from vs_diffusers import peer_copy

    script = peer_copy(args.diffusers, "lcm_lora", tmp) if "peer" in tools else None
    if script is not None:
        pad_to_tokenizer(script)
    args.shards, args.reference = build_data(args, size)
    teacher, record = build_teacher(args, size)
    if args.rounds == 0:  # the teacher only (it is cached: build it once, time the rounds when the machine is idle)
        print(f"teacher: {json.dumps(record)}")
        return 0
    if args.reevaluate is not None:
        return reevaluate(args, size, teacher, record)
    runs = args.work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    rounds: dict[str, list[list[Point]]] = {t: [] for t in tools}
    for r in range(args.rounds):
        for tool in tools:
            print(f"round {r + 1}: {tool} ...", file=sys.stderr, flush=True)
            out = runs / f"{tool}-r{r}"
            if tool == "peer":
                points = peer_run(args, size, teacher, script, r, out)
            else:
                points = ldmkit_run(args, size, teacher, r, out)
            evaluate_points(args, size, teacher, tool, points)
            rounds[tool].append(points)
    return finish(args, size, teacher, runs, rounds, record, "")


def finish(
    args, size: Size, teacher: Path, runs: Path, rounds: dict[str, list[list[Point]]], record: dict, suffix: str
) -> int:
    """Write the rounds (rounds.json: every LoRA and its figures at --eval-steps) and report them."""
    curves = {t: median_curve(rs) for t, rs in rounds.items()}
    (runs / f"rounds{suffix}.json").write_text(
        json.dumps({t: [[p.__dict__ for p in r] for r in rs] for t, rs in rounds.items()}, indent=2)
    )
    n = len(next(iter(rounds.values())))
    if "peer" not in curves:
        print_table(curves, n, args.eval_steps)
        return 0
    baseline = teacher_baseline(args, size, teacher)
    report(curves, n, runs / f"time_to_quality{suffix}.png", record, args.eval_steps, baseline)
    return 0


def reevaluate(args, size: Size, teacher: Path, record: dict) -> int:
    """The LoRAs of a finished run (its rounds.json), evaluated with the current teacher at --eval-steps; the
    table, plot and headline as the run would have printed them, written beside it as rounds-TAG-Nsteps.json
    and time_to_quality-TAG-Nsteps.png."""
    saved = json.loads((args.reevaluate / "rounds.json").read_text())  # main() checked it is there
    rounds = {t: [[Point(**p) for p in r] for r in rs] for t, rs in saved.items()}
    for tool, rs in rounds.items():
        for points in rs:
            evaluate_points(args, size, teacher, tool, points)
    return finish(
        args, size, teacher, args.reevaluate, rounds, record, f"-{teacher_tag(teacher)}-{args.eval_steps}steps"
    )


if __name__ == "__main__":
    sys.exit(main())
