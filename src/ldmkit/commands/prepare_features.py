"""``ldmkit prepare features``: encode a dataset into the MS-COCO feature layout (library: ldmkit.data.prepare_features)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="Diffusers folder with vae/, text_encoder/, tokenizer/ (e.g. SD1.5)."
    )
    parser.add_argument(
        "--data", required=True, help="Image folder, metadata.jsonl folder, WebDataset shards or a *.filelist.list."
    )
    parser.add_argument("--out", required=True, help="Feature folder to write (train/, val/, empty_context.npy).")
    parser.add_argument(
        "--resolution", type=int, default=256, help="Square size the images are resized and centre-cropped to."
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Images per VAE / text-encoder batch.")
    parser.add_argument("--split", choices=["train", "val"], default="train", help="Split folder to write.")
    parser.add_argument(
        "--interpolation",
        choices=["nearest", "bilinear", "bicubic", "lanczos"],
        default="lanczos",
        help="Resize filter. U-ViT's MS-COCO extraction (scripts/extract_mscoco_feature.py) centre-crops a square "
        "and resizes it with LANCZOS; ldmkit resizes the shorter side, then centre-crops (the same pixels up to "
        "the filter's support at the borders).",
    )
    parser.add_argument("--caption-column", default="text", help="Caption field of metadata.jsonl / WebDataset json.")
    parser.add_argument("--max-samples", type=int, default=None, help="Encode only the first N samples.")
    parser.add_argument(
        "--device", default=None, help="Device for the encoders (default: cuda if available, else cpu)."
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ldmkit import inputs, outputs
    from ldmkit.config import DataConfig, ModelConfig
    from ldmkit.data.features import META_FILE
    from ldmkit.data.loader import detect_format, open_dataset
    from ldmkit.data.prepare_features import prepare_features
    from ldmkit.data.transforms import ImageTransform
    from ldmkit.families import load_family
    from ldmkit.families.sd import check_single_text_encoder

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.resolution < 8 or args.resolution % 8:
        # the latents are resolution / 8 (the VAE's downsampling); other sizes would be cut by the VAE
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE's factor), got {args.resolution}")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {args.max_samples}")
    inputs.check_device(args.device)
    inputs.check_image_size(args.resolution, args.resolution, args.batch_size, args.device)  # the VAE's encoder
    inputs.check_path(args.model, "--model", "folder")
    # A feature folder is filled as it goes and resumed by a re-run: its meta.json says it is one of ours.
    outputs.check(args.out, "prepare features", overwrite=args.overwrite, own=("meta.json",))
    cfg = DataConfig(
        path=args.data,
        resolution=args.resolution,
        center_crop=True,
        random_flip=False,
        interpolation=args.interpolation,
        caption_column=args.caption_column,
        max_samples=args.max_samples,
        allow_shell=False,
    )
    if detect_format(args.data) == "features":
        raise UserError(f"--data {args.data} is already a feature folder")
    dataset = open_dataset(cfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_family(ModelConfig(pretrained=args.model), device=device, encode_batch_size=args.batch_size)
    check_single_text_encoder(models, "prepare features")
    # A resumed or second-split run must use the same encoders and resolution as the files already there.
    meta = {
        "resolution": args.resolution,
        "fingerprint": models.fingerprint(),
        "model": str(Path(args.model).resolve()),
        "scaling_factor": models.vae_scale,
    }
    meta_path = Path(args.out) / META_FILE
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        for key in ("resolution", "fingerprint"):
            if old.get(key) != meta[key]:
                raise UserError(
                    f"{args.out} holds features with another {key} ({old.get(key)} vs {meta[key]}); use a new --out"
                )
    else:
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    total = len(dataset) if hasattr(dataset, "__len__") else None
    counts = prepare_features(
        models,
        dataset.lazy_samples(),
        args.out,
        transform=ImageTransform.from_config(cfg),
        split=args.split,
        batch_size=args.batch_size,
        total=total,
    )
    print(
        f"{args.out}/{args.split}: {counts['written']} written, {counts['skipped']} already there, "
        f"{counts['unreadable']} unreadable"
    )
    return 0
