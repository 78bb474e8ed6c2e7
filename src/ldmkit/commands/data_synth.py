"""``ldmkit data synth``: synthetic text-to-image datasets (library: ldmkit.data.synth, ldmkit.data.glyphs)."""

from __future__ import annotations

import argparse

from ldmkit.outputs import add_overwrite_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help="Output folder (created; must be empty, absent or an earlier output of data synth).",
    )
    parser.add_argument("--num", type=int, required=True, help="Number of samples.")
    parser.add_argument(
        "--format",
        choices=("folder", "wds"),
        default="folder",
        help="folder: NNNNN.png + .txt + metadata.jsonl; wds: WebDataset tar shards (png, txt, json).",
    )
    parser.add_argument("--size", type=int, default=32, help="Image side in pixels (square).")
    parser.add_argument("--seed", type=int, default=0, help="Seed; sample i depends only on (seed, i).")
    parser.add_argument("--shard-size", type=int, default=1000, help="Samples per WebDataset shard.")
    parser.add_argument(
        "--kind",
        choices=("shapes", "glyphs"),
        default="shapes",
        help="shapes: coloured shapes whose captions state four scoreable attributes; glyphs: letters whose "
        "captions differ in one word (a label, as class-labelled data).",
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ldmkit import inputs, outputs
    from ldmkit.data.synth import write_dataset

    # drawing peaks at about 580 bytes a pixel (supersampled float64 coverage; tracemalloc at 512 px)
    inputs.check_memory(f"--size {args.size}", 600 * args.size**2, "draw one image")
    out = outputs.check(args.out, "data synth", overwrite=args.overwrite)
    with outputs.staged(out, "data synth") as tmp:
        written = write_dataset(tmp, args.num, args.format, args.size, args.seed, args.shard_size, args.kind)
    what = "images" if args.format == "folder" else "shards"
    print(f"wrote {args.num} {args.kind} samples ({len(written)} {what}, {args.size} px) to {args.out}")
    return 0
