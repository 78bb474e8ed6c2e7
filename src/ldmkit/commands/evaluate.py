"""``ldmkit evaluate``: speed and quality per scheduler and step count (library: ldmkit.eval.evaluate)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ldmkit.diffusion.samplers import SCHEDULERS, TEACHER_SOLVERS
from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    _teacher_arguments(parser)
    _measure_arguments(parser)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its prompts and how it is sampled."""
    add = parser.add_argument
    add("--model", required=True, help="Local diffusers pipeline folder (SD1.5, SDXL, U-ViT, or an ldmkit export).")
    add("--lora", default=None, help="LoRA file or folder to load on top (e.g. an LCM-LoRA).")
    add("--tokenizer", default=None, help="Tokenizer folder for a single-file --model (default: the HF cache).")
    add("--allow-pickle", action="store_true", help="Allow a pickled .ckpt --model (it can run code when loaded).")
    add(
        "--no-fuse-lora",
        action="store_true",
        help="Keep the LoRA as separate peft layers; default: fuse it into the weights (what merge-lora saves), so "
        "speed figures measure the model rather than the unfused adapter's extra matmuls.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompts",
        default=None,
        help="Text file with one prompt per line, or a JSON file: COCO's captions file (e.g. captions_val2014.json: "
        "the first caption of each image) or a list of captions.",
    )
    src.add_argument(
        "--data",
        default=None,
        help="Dataset (folder, WebDataset shards, file list): its captions are the prompts and its "
        "images the FD/KID reference.",
    )
    src.add_argument(
        "--shapes", action="store_true", help="Held-out synthetic-shapes prompts (ldmkit data synth vocabulary)."
    )
    add("--steps", default="1,2,4,8", help="Comma-separated step counts to evaluate.")
    add(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=None,
        help="Sampler; default: the one the export saved (its ldmkit_sampling.json), else the folder's own.",
    )
    add(
        "--guidance",
        type=float,
        default=None,
        help="Guidance scale; default: the export's, else the model's (1.0 for an LCM-LoRA, 8.0 for a full LCM, else 7.5).",
    )
    add(
        "--eta",
        type=float,
        default=None,
        help="eta of the sampler: TCD's gamma (0 deterministic); default: the export's (TCD: its gamma, PCM: 0), "
        "else the pipeline's.",
    )


def _teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """The teacher's training-free solvers next to the model."""
    add = parser.add_argument
    add(
        "--teacher-solvers",
        nargs="?",
        const=",".join(TEACHER_SOLVERS),
        default=None,
        help="Also evaluate the teacher with these training-free solvers at the same steps and seeds "
        f"(comma-separated; the flag alone: {','.join(TEACHER_SOLVERS)} = DDIM, DPM-Solver++ 2M, UniPC), "
        "for equal-step and equal-compute (UNet evaluations) comparisons.",
    )
    add(
        "--teacher",
        default=None,
        help="Teacher pipeline folder for --teacher-solvers; default: --model (without the --lora).",
    )
    add(
        "--teacher-guidance",
        type=float,
        default=None,
        help="Guidance scale of the teacher's solvers; default: the teacher pipeline's default.",
    )


def _measure_arguments(parser: argparse.ArgumentParser) -> None:
    """How many images, at what size, measured against what, written where."""
    add = parser.add_argument
    add(
        "--num-images",
        type=int,
        default=100,
        help="Number of prompts (one image each); fewer if the file or data has fewer.",
    )
    add("--seed", type=int, default=0, help="Image i of every setting uses seed + i.")
    add("--batch-size", type=int, default=8, help="Prompts per pipeline call.")
    add("--height", type=int, default=None, help="Image height; default: the model's.")
    add("--width", type=int, default=None, help="Image width; default: the model's.")
    add(
        "--reference",
        default=None,
        help="Reference images for FD/KID/FID: an image folder (e.g. COCO val2014 images) or a dataset (default with "
        "--data: the data's images).",
    )
    add("--max-reference", type=int, default=2000, help="Use at most this many reference images.")
    add(
        "--feature-net",
        default=None,
        help="Local TorchScript (.pt) or torch.export (.pt2) feature network for FD/KID, e.g. StyleGAN2-ADA's "
        "inception-2015-12-05.pt; default: ldmkit's weight-free random conv features (comparable only within ldmkit).",
    )
    add(
        "--metrics",
        default="fd",
        help="Comma-separated quality metrics: fd (ldmkit's built-in FD and KID on weight-free random conv features, "
        "comparable only within ldmkit; the offline default), fid (FID with the standard Inception-v3 features, "
        "comparable with published FIDs: needs --fid-weights), clip_score (CLIP score: --clip-model). fd and fid need "
        "reference images (--reference or --data).",
    )
    add(
        "--fid-weights",
        default=None,
        help="The Inception-v3 FID weights file (weights-inception-2015-12-05-6726825d.pth, the TF weights as "
        "torch-fidelity / torchmetrics / pytorch-fid use them); default: torch hub's cache.",
    )
    add(
        "--clip-model",
        "--clip",
        dest="clip",
        default=None,
        help="CLIP for clip_score: a local transformers folder or a Hugging Face id in the local cache (offline); "
        "default with --metrics clip_score: openai/clip-vit-large-patch14. Given alone, adds clip_score.",
    )
    add("--save-images", action="store_true", help="Also write every generated image (steps-N/IIIII.png).")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    add(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="Weights dtype; auto: fp16 on CUDA, else fp32.",
    )
    add(
        "--no-caption-adherence",
        action="store_true",
        help="Skip the caption-adherence check (by default, with >= 2 distinct prompts: does the image change "
        "with the caption at a fixed seed, and on labelled --data does a label classifier find the prompt's label).",
    )
    add(
        "--heldout",
        default=None,
        help="Labelled images the model was not trained on (any dataset; captions = labels): the label classifier "
        "of the caption-adherence check learns from them; default with labelled --data: a split of --data.",
    )
    add("--out", required=True, help="Output folder: metrics.json, quality_vs_steps.png, grid-steps-N.png.")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ldmkit.eval.adherence import representative_steps
    from ldmkit.eval.evaluate import evaluate_pipeline, parse_steps
    from ldmkit.inference import check_sampling, resolve_device, resolve_dtype

    steps = parse_steps(args.steps)
    solvers = _check_arguments(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    inputs = _read_inputs(args, device)
    pipe, sampling = _load_model(args, dtype)
    for n in steps:
        check_sampling(pipe, n, args.height, args.width)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    out = Path(args.out)
    metrics = evaluate_pipeline(
        pipe,
        inputs.prompts,
        steps,
        args.guidance,
        args.seed,
        out_dir=out,
        save_images=args.save_images,
        eta=args.eta,
        **inputs.common(args),
    )
    metrics.update(
        model=str(args.model),
        lora=args.lora,
        lora_fused=bool(args.lora and not args.no_fuse_lora),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        sampling_record=None if sampling.record is None else asdict(sampling.record),
    )
    label = (metrics["scheduler"] or "pipeline") + (" + LoRA" if args.lora else "")
    runs = {label: metrics["settings"]}
    adherence = None
    if inputs.probe is not None:
        # The model at the step count it is meant for (few-step models: 4 or fewer), one count to stay cheap.
        adherence = _adherence_header(inputs.probe)
        adherence["models"][label] = _adherence_entry(
            inputs.probe, label, pipe, representative_steps(steps), metrics["guidance"], args, eta=args.eta
        )
    if solvers:
        del pipe
        runs.update(_evaluate_teacher(args, solvers, steps, inputs, metrics, adherence, dtype, device, out))
    metrics["caption_adherence"] = adherence
    _write_outputs(out, metrics, runs, label, adherence, inputs.probe, args)
    return 0


def _check_arguments(args: argparse.Namespace) -> list[str]:
    """The teacher's solvers; one UserError for any value the run cannot take."""
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    solvers = [s.strip() for s in args.teacher_solvers.split(",") if s.strip()] if args.teacher_solvers else []
    unknown = [s for s in solvers if s not in SCHEDULERS]
    if unknown or (args.teacher_solvers is not None and not solvers):
        raise UserError(f"--teacher-solvers: unknown solver(s) {unknown}; choose from {', '.join(SCHEDULERS)}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    from ldmkit import inputs, outputs

    inputs.check_arguments(args, devices=("--device",), seeds=("--seed",), files=("--feature-net",),
                           finite=("--guidance", "--teacher-guidance"))  # fmt: skip
    inputs.check_image_size(args.height, args.width, args.batch_size, args.device)
    outputs.verify(("--model", args.model), ("--lora", args.lora), ("--teacher", args.teacher))  # exports unchanged
    outputs.claim(args.out, "evaluate", overwrite=args.overwrite, own=("metrics.json",))  # resumed: teacher/ cache
    return solvers


@dataclass
class _Inputs:
    """The prompts, the FD/KID/FID reference, the metrics' networks (built-in FD features, Inception FID, CLIP
    scorer), the adherence probe."""

    prompts: list[str]
    reference: list | None
    features: Any
    clip: Any
    probe: _Probe | None
    fid: Any = None
    fd: bool = True

    def common(self, args: argparse.Namespace) -> dict[str, Any]:
        """The settings every evaluated model shares."""
        return dict(
            batch_size=args.batch_size,
            reference=self.reference,
            feature_extractor=self.features,
            clip=self.clip,
            fid=self.fid,
            fd=self.fd,
            height=args.height,
            width=args.width,
        )


def _read_inputs(args: argparse.Namespace, device) -> _Inputs:
    from ldmkit.data.synth import heldout_prompts
    from ldmkit.eval.evaluate import read_data, read_images, read_prompts
    from ldmkit.eval.fid import load_feature_extractor

    reference, data_images, captions = None, None, None
    if args.prompts:
        prompts = read_prompts(args.prompts)[: args.num_images]
    elif args.data:
        data_images, captions = read_data(args.data, max(args.num_images, args.max_reference))
        prompts = captions[: args.num_images]
        reference = data_images[: args.max_reference]
    else:
        prompts = heldout_prompts(args.num_images, args.seed)
    # Caption adherence reads the prompts evaluated, or with --data every caption read (the labels).
    probe = None if args.no_caption_adherence else _adherence_probe(args, captions or prompts, data_images)
    if args.reference:
        reference = read_images(args.reference, args.max_reference)
    metrics = _metric_networks(args, reference is not None, device)
    features = load_feature_extractor(args.feature_net, device) if reference is not None and metrics["fd"] else None
    return _Inputs(prompts, reference, features, metrics["clip"], probe, fid=metrics["fid"], fd=metrics["fd"])


def _metric_networks(args: argparse.Namespace, has_reference: bool, device) -> dict[str, Any]:
    """--metrics: whether to compute the built-in FD, and the FID and CLIP-score networks (None when not asked);
    a UserError naming what is missing (reference images, weights, library) before anything is generated."""
    from ldmkit.eval.metrics import DEFAULT_CLIP, InceptionFID, LibraryClipScore, parse_metrics

    names = parse_metrics(args.metrics)
    if args.clip and "clip_score" not in names:
        names.append("clip_score")  # --clip-model alone asks for it (as --clip did)
    if "fid" in names and not has_reference:
        raise UserError(
            "--metrics fid needs reference images: pass --reference DIR (e.g. COCO val2014 images) or --data"
        )
    return {
        "fd": "fd" in names,
        "fid": InceptionFID(args.fid_weights, device) if "fid" in names else None,
        "clip": LibraryClipScore(args.clip or DEFAULT_CLIP, device) if "clip_score" in names else None,
    }


def _single_file_options(args: argparse.Namespace) -> dict:
    """What a single-file --model (or --teacher) needs: --tokenizer, --allow-pickle."""
    return dict(allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)


def _load_model(args: argparse.Namespace, dtype):
    """The model as its export's sampling record says (ldmkit.inference.load_export), the LoRA fused unless
    --no-fuse-lora; --guidance and --eta default to the record's."""
    from ldmkit.inference import load_export

    single = _single_file_options(args)
    if args.lora:
        pipe, sampling = load_export(args.lora, base=args.model, dtype=dtype, scheduler=args.scheduler, **single)
        if not args.no_fuse_lora:
            pipe.fuse_lora()  # time the model as a merged export runs (ldmkit merge-lora)
    else:
        pipe, sampling = load_export(args.model, dtype=dtype, scheduler=args.scheduler, **single)
    args.guidance = sampling.guidance if args.guidance is None else args.guidance
    args.eta = sampling.eta if args.eta is None else args.eta
    return pipe, sampling


def _evaluate_teacher(args, solvers, steps, inputs: _Inputs, metrics, adherence, dtype, device, out: Path) -> dict:
    """The teacher with its training-free solvers at the same steps and seeds (into ``metrics["teacher"]``);
    returns their rows for the plots."""
    from ldmkit.eval.evaluate import evaluate_solvers
    from ldmkit.inference import load_pipeline, set_scheduler

    teacher = load_pipeline(args.teacher or args.model, dtype, **_single_file_options(args))
    teacher.to(device)
    teacher.set_progress_bar_config(disable=True)
    metrics["teacher"] = evaluate_solvers(
        teacher,
        solvers,
        inputs.prompts,
        steps,
        args.teacher_guidance,
        args.seed,
        out_dir=out / "teacher",
        **inputs.common(args),
    )
    metrics["teacher_model"] = str(args.teacher or args.model)
    if adherence is not None:
        # Whether samples follow captions is the teacher model's property rather than a solver's: one
        # solver, at the teacher's largest (most faithful) step count.
        first = metrics["teacher"][solvers[0]]
        set_scheduler(teacher, solvers[0])
        name = f"teacher {solvers[0]}"
        adherence["models"][name] = _adherence_entry(inputs.probe, name, teacher, max(steps), first["guidance"], args)
    return {f"teacher {name}": m["settings"] for name, m in metrics["teacher"].items()}


def _write_outputs(out: Path, metrics, runs, label, adherence, probe, args: argparse.Namespace) -> None:
    from ldmkit.eval.plot import quality_vs_steps

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    quality_vs_steps(runs).save(out / "quality_vs_steps.png")
    quality_vs_steps(runs, x="unet_evals_per_image").save(out / "quality_vs_unet_evals.png")
    print(_metric_legend(metrics))
    _print_table(label, metrics["settings"])
    for name, m in metrics.get("teacher", {}).items():
        _print_table(f"teacher {name} (guidance {m['guidance']})", m["settings"])
    _print_adherence(adherence, probe, args)
    print(f"wrote {out / 'metrics.json'}, {out / 'quality_vs_steps.png'} and {out / 'quality_vs_unet_evals.png'}")


@dataclass
class _Probe:
    """What the caption-adherence check asks every model: the prompts of the sensitivity grid and, on
    labelled data, a label classifier with its accuracy on real images it did not learn from."""

    prompts: list[str]
    labels: list[str] | None = None
    classifier: Any = None
    real_accuracy: float | None = None
    trained_on: str | None = None  # "--heldout" or "--data"
    train_images: int = 0
    test_images: int = 0


def _adherence_probe(args: argparse.Namespace, captions: list[str], data_images: list | None) -> _Probe | None:
    """None when the prompts leave nothing to follow (fewer than 2 distinct ones and no --heldout labels)."""
    from ldmkit.eval.adherence import fit_label_classifier, labels_of, sensitivity_prompts
    from ldmkit.eval.evaluate import read_data

    probe = _Probe(prompts=sensitivity_prompts(captions))
    # Label accuracy needs labelled images: --heldout, else --data when its captions are labels.
    labels = labels_of(captions) if data_images is not None else None
    images, image_captions = data_images, captions
    if args.heldout:
        if not Path(args.heldout).exists() and "://" not in args.heldout:
            raise UserError(f"--heldout not found: {args.heldout}")
        images, image_captions = read_data(args.heldout, 2000, option="--heldout")
        held_labels = labels_of(image_captions)
        if held_labels is None:
            raise UserError(
                f"--heldout {args.heldout}: its captions are not labels (2 to 50 distinct captions with at least "
                "10 images each)"
            )
        if labels is not None and labels != held_labels:
            raise UserError(f"--heldout {args.heldout}: its labels differ from those of --data {args.data}")
        labels = held_labels
    if len(probe.prompts) < 2 and labels is None:
        return None
    if labels is not None:
        probe.labels = labels
        # Datasets are often grouped by label (class folders, sorted names): shuffled before the split.
        probe.classifier, probe.real_accuracy = fit_label_classifier(
            labels, images, image_captions, seed=args.seed, shuffle=True
        )
        probe.trained_on = "--heldout" if args.heldout else "--data"
        probe.train_images = len(images) * 3 // 4
        probe.test_images = len(images) - probe.train_images
        if len(probe.prompts) < 2:  # --prompts with one prompt: the labels are the prompts
            probe.prompts = sensitivity_prompts(labels)
    return probe


def _adherence_header(probe: _Probe) -> dict[str, Any]:
    from ldmkit.eval.adherence import SEEDS

    header: dict[str, Any] = {"prompts": probe.prompts, "seeds": SEEDS, "labels": probe.labels}
    if probe.labels is not None:
        header.update(
            chance=1 / len(probe.labels),
            classifier_real_accuracy=probe.real_accuracy,
            classifier_trained_on=probe.trained_on,
            # a split of --data: the model may have been trained on the classifier's images, and samples that
            # copy them are easier to judge; --heldout images are independent of the model's training
            classifier_held_out=probe.trained_on == "--heldout",
            classifier_train_images=probe.train_images,
            classifier_test_images=probe.test_images,
        )
    header["models"] = {}
    return header


def _adherence_entry(
    probe: _Probe,
    name: str,
    pipe,
    steps: int,
    guidance: float | None,
    args: argparse.Namespace,
    eta: float | None = None,
) -> dict[str, Any]:
    from ldmkit.eval.adherence import caption_adherence

    per_label = max(1, args.num_images // len(probe.labels)) if probe.labels else 1
    entry = caption_adherence(
        pipe,
        probe.prompts,
        steps,
        guidance,
        args.seed,
        classifier=probe.classifier,
        samples_per_label=per_label,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        eta=eta,
    )
    if entry["warning"]:  # in the log as it is measured; the WARNING lines follow the tables
        logger.warning("%s: %s", name, entry["warning"])
    return {"steps": steps, "guidance": guidance, **entry}


def _print_adherence(adherence: dict[str, Any] | None, probe: _Probe | None, args: argparse.Namespace) -> None:
    if adherence is None:
        why = "--no-caption-adherence" if args.no_caption_adherence else "fewer than 2 distinct prompts"
        print(f"caption adherence: skipped ({why})")
        return
    print(
        f"caption adherence ({len(adherence['prompts'])} prompts x {adherence['seeds']} seeds; sensitivity = how much "
        "the image changes with the caption / with the seed: ~0 ignores captions, ~1 or more follows them)"
    )
    for name, e in adherence["models"].items():
        label = f", label accuracy {e['label_accuracy']:.2f}" if "label_accuracy" in e else ""
        print(
            f"  {name} ({e['steps']} steps): sensitivity {e['sensitivity']:.2f} (caption distance "
            f"{e['caption_distance']:.3f}, seed distance {e['seed_distance']:.3f}){label}"
        )
    if probe is not None and probe.labels is not None:
        source = (
            f"--heldout {args.heldout}"
            if probe.trained_on == "--heldout"
            else f"--data {args.data}, which the model may have been trained on (pass --heldout DIR for "
            "held-out labelled images)"
        )
        print(
            f"  label classifier: {len(probe.labels)} labels (chance {1 / len(probe.labels):.2f}); "
            f"accuracy {probe.real_accuracy:.2f} on {probe.test_images} real images it did not learn from; "
            f"trained on {probe.train_images} images of {source}"
        )
    for name, e in adherence["models"].items():
        if e["warning"]:
            print(f"WARNING {name}: {e['warning']}")


# The columns of the tables: (header, settings key, width, format); a column shows when any row has a value.
COLUMNS = (
    ("adherence", "adherence", 9, ".3f"),
    ("FD(ldmkit)", "fd", 10, ".3f"),
    ("KID(ldmkit)", "kid", 11, ".4f"),
    ("FID", "fid", 9, ".2f"),
    ("CLIP", "clip_score", 6, ".2f"),
)


def _metric_legend(metrics: dict[str, Any]) -> str:
    """Which metric each column shows (features, networks, reference size)."""
    parts = []
    if metrics.get("feature_net"):
        parts.append(f"FD/KID(ldmkit): {metrics['feature_net']} features (comparable only within ldmkit)")
    if metrics.get("fid_features"):
        parts.append(f"FID: {metrics['fid_features']}")
    if metrics.get("feature_net") or metrics.get("fid_features"):
        parts.append(f"against {metrics['reference_images']} reference images")
    if metrics.get("clip_model"):
        parts.append(f"CLIP: 100 x cos, {metrics['clip_model']}")
    return "metrics: " + "; ".join(parts) if parts else "metrics: none against references"


def _print_table(label: str, settings: list[dict]) -> None:
    def value(s: dict, key: str):
        return (s["adherence"] or {}).get("all") if key == "adherence" else s.get(key)

    columns = [c for c in COLUMNS if any(value(s, c[1]) is not None for s in settings)]
    print(label)
    print(f"{'steps':>5} {'s/img':>8} {'evals/img':>9} " + " ".join(f"{h:>{w}}" for h, _, w, _ in columns))
    for s in settings:
        cells = [_cell(value(s, key), w, fmt) for _, key, w, fmt in columns]
        print(f"{s['steps']:>5} {s['seconds_per_image']:>8.4f} {s['unet_evals_per_image']:>9.1f} " + " ".join(cells))


def _cell(v: float | None, width: int, fmt: str) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"
