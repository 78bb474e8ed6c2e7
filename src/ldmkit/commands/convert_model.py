"""``ldmkit convert-model --in X --to single-file|diffusers --out Y``: a model between the diffusers folder
layout and one original-layout ``.safetensors`` (what A1111, ComfyUI and kohya sd-scripts load).

``--in`` is any model reference (a diffusers folder, a single-file checkpoint, a cached repo id); the
single file carries the folder's diffusers configs in its metadata, so folder -> file -> folder gives the
same weights and configs back (families/single_file.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--in",
        dest="src",
        required=True,
        help="Model: a diffusers folder, a single-file SD1.x/SD2.x/SDXL checkpoint, or a cached repo id.",
    )
    parser.add_argument("--to", choices=("single-file", "diffusers"), required=True, help="Output layout.")
    parser.add_argument(
        "--out", required=True, help="Output: a .safetensors file (single-file) or a folder (diffusers)."
    )
    parser.add_argument("--allow-pickle", action="store_true", help="Allow a pickled .ckpt input (it can run code).")
    parser.add_argument(
        "--tokenizer", default=None, help="Tokenizer folder for a single-file input (default: HF cache)."
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ldmkit import inputs, outputs
    from ldmkit.families.single_file import save_single_file
    from ldmkit.inference import load_pipeline, read_sampling_record
    from ldmkit.models.uvit import UViT

    if args.to == "single-file" and not args.out.endswith(".safetensors"):
        raise UserError(f"--out of --to single-file must end in .safetensors: {args.out}")
    kind = "file" if args.to == "single-file" else "folder"
    out = outputs.check(args.out, "convert-model", kind=kind, overwrite=args.overwrite)
    if Path(args.src).is_file():
        inputs.check_safetensors(args.src, "--in")
    pipe = load_pipeline(args.src, allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)
    # The sampling record (an ldmkit export's scheduler, steps, guidance, eta) travels with the weights: a
    # folder's ldmkit_sampling.json <-> the single file's metadata.
    record = read_sampling_record(args.src) if Path(args.src).exists() else None
    if args.to == "single-file" and isinstance(pipe.unet, UViT):
        raise UserError("a U-ViT has no original single-file layout; keep it as a diffusers folder")
    with outputs.staged(out, "convert-model", kind=kind) as tmp:
        if args.to == "single-file":
            save_single_file(pipe, tmp, record=record)
        else:
            pipe.save_pretrained(tmp)
            if record is not None:
                record.save(tmp)
    print(f"wrote {type(pipe).__name__} from {args.src} to {args.out} ({args.to})")
    return 0
