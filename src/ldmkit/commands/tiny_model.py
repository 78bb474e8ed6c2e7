"""``ldmkit tiny-model``: a tiny random SD1.5/SDXL-architecture pipeline, offline (library: ldmkit.models.tiny)."""

from __future__ import annotations

import argparse

from ldmkit.errors import UserError
from ldmkit.outputs import add_overwrite_argument

# ldmkit.models.tiny.ARCHS (tests/test_cli.py checks they agree), without torch
ARCHS = ("sd15", "sd2v", "sdxl", "sd3", "flux", "flux-schnell")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        required=True,
        help="Architecture to mimic: sd15, sd2v (SD2.x, v-prediction), sdxl, sd3 (SD3.5 Medium), "
        "flux (FLUX.1-dev) or flux-schnell.",
    )
    parser.add_argument("--out", required=True, help="Folder to write the diffusers pipeline to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument(
        "--single-file",
        default=None,
        metavar="FILE.safetensors",
        help="sd3 / flux / flux-schnell: also write the transformer as one original-layout file (BFL / SAI key "
        "names, what ComfyUI keeps); train on it with model.pretrained=FILE model.components_from=<--out folder>.",
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ldmkit import inputs, outputs
    from ldmkit.models.tiny import build_tiny_pipeline

    inputs.check_seed("--seed", args.seed)
    out = outputs.check(args.out, "tiny-model", overwrite=args.overwrite)
    single = None
    if args.single_file:
        if args.arch not in ("sd3", "flux", "flux-schnell"):
            raise UserError(f"--single-file writes a FLUX / SD3 transformer file; --arch {args.arch} has a UNet")
        single = outputs.check(
            args.single_file, "tiny-model", kind="file", overwrite=args.overwrite, option="--single-file"
        )
        if single.suffix != ".safetensors":
            raise UserError(f"--single-file must end in .safetensors: {single}")
    with outputs.staged(out, "tiny-model") as tmp:
        build_tiny_pipeline(args.arch, tmp, seed=args.seed)
    print(f"tiny {args.arch} pipeline written to {out}")
    if single is not None:  # from the finished folder (the file may sit inside it)
        import diffusers

        from ldmkit.families.transformer_file import KINDS, save_transformer_file

        transformer = getattr(diffusers, KINDS[args.arch][2]).from_pretrained(out, subfolder="transformer")
        with outputs.staged(single, "tiny-model", kind="file") as tmp_file:
            save_transformer_file(transformer, tmp_file)
        print(f"its transformer in the original layout: {single}")
    return 0
