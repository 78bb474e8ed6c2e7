"""``ldmkit tiny-model``: a tiny random SD1.5/SDXL-architecture pipeline, offline (library: ldmkit.models.tiny)."""

from __future__ import annotations

import argparse

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
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ldmkit import inputs, outputs
    from ldmkit.models.tiny import build_tiny_pipeline

    inputs.check_seed("--seed", args.seed)
    out = outputs.check(args.out, "tiny-model", overwrite=args.overwrite)
    with outputs.staged(out, "tiny-model") as tmp:
        build_tiny_pipeline(args.arch, tmp, seed=args.seed)
    print(f"tiny {args.arch} pipeline written to {out}")
    return 0
