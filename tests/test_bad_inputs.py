"""Bad inputs, each met with exit 2 and one line that names the key, file or module: never a traceback,
never silence. One table over configs, data, checkpoints and commands; the CLI runs in-process."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from ldmkit.cli import main
from ldmkit.train import checkpoint as ckpt


@dataclass
class Case:
    id: str
    argv: Callable[[dict[str, Path]], list[str]]
    expect: str  # regex the error line must match (after "ldmkit: error: ")


def toy(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    """``ldmkit train`` of the toy method on the shapes folder, plus ``extra`` overrides."""
    return lambda p: [
        "train",
        "--method.name=toy",
        f"--data.path={p['shapes']}",
        "--data.resolution=16",
        "--data.num_workers=0",
        "--train.max_steps=2",
        "--train.report_to=none",
        f"--output_dir={p['tmp'] / 'run'}",
        *[e.format(**p) for e in extra],
    ]


def recipe(name: str, *extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: ["train", name, f"--output_dir={p['tmp'] / 'run'}", *[e.format(**p) for e in extra]]


CONFIG_CASES = [
    Case("lr negative", toy("--train.learning_rate=-1"), r"train.learning_rate must be a positive"),
    Case("lr zero", toy("--train.learning_rate=0"), r"train.learning_rate must be a positive"),
    Case("lr nan", toy("--train.learning_rate=nan"), r"train.learning_rate"),
    Case("lr inf", toy("--train.learning_rate=inf"), r"train.learning_rate"),
    Case("beta1 1.5", toy("--train.adam_beta1=1.5"), r"train.adam_beta1 must be in \[0, 1\)"),
    Case("beta2 negative", toy("--train.adam_beta2=-0.1"), r"train.adam_beta2 must be in \[0, 1\)"),
    Case("weight decay negative", toy("--train.adam_weight_decay=-0.01"), r"train.adam_weight_decay must be >= 0"),
    Case("epsilon zero", toy("--train.adam_epsilon=0"), r"train.adam_epsilon must be a positive"),
    Case("grad norm negative", toy("--train.max_grad_norm=-1"), r"train.max_grad_norm must be positive"),
    Case("grad norm zero", toy("--train.max_grad_norm=0"), r"train.max_grad_norm must be positive"),
    Case("num_workers negative", toy("--data.num_workers=-1"), r"data.num_workers must be >= 0"),
    Case("log_every zero", toy("--train.log_every=0"), r"train.log_every must be >= 1"),
    Case("encode_batch_size zero", toy("--data.encode_batch_size=0"), r"data.encode_batch_size must be >= 1"),
    Case("checkpoint_every negative", toy("--train.checkpoint_every=-1"), r"train.checkpoint_every must be >= 0"),
    Case("validate_every negative", toy("--train.validate_every=-1"), r"train.validate_every must be >= 0"),
    Case("warmup negative", toy("--train.lr_warmup_steps=-5"), r"train.lr_warmup_steps must be >= 0"),
    Case("batch size zero", toy("--train.batch_size=0"), r"train.batch_size must be >= 1"),
    Case("max_steps zero", toy("--train.max_steps=0"), r"train.max_steps must be >= 1"),
    Case("accumulation zero", toy("--train.gradient_accumulation_steps=0"), r"gradient_accumulation_steps must be"),
    Case("resolution 4", toy("--data.resolution=4"), r"data.resolution must be >= 8"),
    Case("empty prompts 1.5", toy("--data.proportion_empty_prompts=1.5"), r"data.proportion_empty_prompts must be"),
    Case("total limit zero", toy("--train.checkpoints_total_limit=0"), r"train.checkpoints_total_limit must be >= 1"),
    Case("max_samples zero", toy("--data.max_samples=0"), r"data.max_samples must be >= 1"),
    Case("shuffle buffer zero", toy("--data.shuffle_buffer=0"), r"data.shuffle_buffer must be >= 1"),
    Case("fp16 on a cpu", toy("--train.mixed_precision=fp16"), r"fp16 needs a CUDA GPU"),
    Case("fp16 recipe on a cpu", recipe("lcm_lora/sd15"), r"fp16 needs a CUDA GPU"),
    Case("mixed precision bogus", toy("--train.mixed_precision=fp8"), r"train.mixed_precision"),
    Case("scheduler bogus", toy("--train.lr_scheduler=warm"), r"train.lr_scheduler"),
    Case("data format bogus", toy("--data.format=zip"), r"data.format"),
    Case("output_dir is a file", toy("--output_dir={file}"), r"output_dir is a file"),
    Case("cache_dir is a file", toy("--data.cache_dir={file}"), r"data.cache_dir is a file"),
    Case("resume_from missing", toy("--train.resume_from=/no/such/checkpoint"), r"train.resume_from must be"),
    Case("abbreviated key", toy("--train.max_step=3"), r"unrecognized arguments: --train.max_step=3"),
    Case("abbreviated group key", toy("--data.res=48"), r"unrecognized arguments: --data.res=48"),
    Case("unknown key", toy("--train.fancy=1"), r"--train.fancy"),
    Case("wrong type", toy("--train.max_steps=abc"), r"train.max_steps"),
    Case("unknown method", lambda p: ["train", "--method.name=nope"], r"unknown method.name 'nope'"),
    Case("recipe names no method", lambda p: ["train", str(p["no_method"])], r"names no method"),
    Case("recipe missing", lambda p: ["train", "lcm_lora/nope"], r"config file not found: lcm_lora/nope"),
    Case("recipe not a mapping", lambda p: ["train", str(p["a_list"])], r"a recipe must be a YAML mapping"),
    Case("recipe bad yaml", lambda p: ["train", str(p["bad_yaml"])], r"bad.yaml: not valid YAML \(line \d+"),
    Case("recipe unknown key", lambda p: ["train", str(p["typo_recipe"])], r"pretraind"),
    Case(
        "lora rank zero",
        recipe("lcm_lora/debug", "--method.lora_rank=0"),
        r"method.lora_rank must be (>= 1|at least 1)",
    ),
    Case("w_min above w_max", recipe("lcm_lora/debug", "--method.w_min=20"), r"method.w_min \(20.0\) must be <="),
    Case("ddim timesteps zero", recipe("lcd/debug", "--method.num_ddim_timesteps=0"), r"num_ddim_timesteps must be"),
    Case("huber c zero", recipe("lcm_lora/debug", "--method.huber_c=0"), r"method.huber_c must be > 0"),
    Case("lora dropout one", recipe("lcm_lora/debug", "--method.lora_dropout=1.0"), r"method.lora_dropout"),
    Case("ema decay 1.5", recipe("lcd/debug", "--method.ema_decay=1.5"), r"method.ema_decay must be in \[0, 1\]"),
    Case("lcm validation steps", recipe("lcd/debug", "--method.validation_steps=[100]"), r"validation_steps"),
    Case("loss type bogus", recipe("lcd/debug", "--method.loss_type=l3"), r"method.loss_type"),
    Case("snr gamma negative", recipe("lora/debug", "--method.snr_gamma=-1"), r"method.snr_gamma must be positive"),
    Case(
        "text encoder with cache",
        recipe("lora/debug", "--method.train_text_encoder=true", "--data.cache=true"),
        r"train_text_encoder needs captions",
    ),
    Case("lora alpha negative", recipe("lora/debug", "--method.lora_alpha=-4"), r"method.lora_alpha must be positive"),
    Case(
        "lora targets empty", recipe("lora/debug", "--method.lora_target_modules=[]"), r"lora_target_modules is empty"
    ),
]

DATA_CASES = [
    Case("data path missing", toy("--data.path=/no/such/folder"), r"/no/such/folder"),
    Case("data path empty folder", toy("--data.path={empty}"), r"no images"),
    Case("metadata bad json", toy("--data.path={bad_metadata}"), r"metadata.jsonl:2: invalid JSON"),
    Case(
        "metadata missing column",
        toy("--data.path={no_column}"),
        r"metadata.jsonl:1: no 'text' field \(the line has: file_name, caption; set data.caption_column\)",
    ),
    Case("all images unreadable", toy("--data.path={broken}"), r"no readable image"),
    Case("only escaping paths", toy("--data.path={escaping}"), r"no images"),
    Case("pipe url without opt-in", toy("--data.path=pipe:cat shard.tar"), r"allow_shell"),
]


def rows(name: str) -> Callable[[dict[str, Path]], list[str]]:
    """The toy run on the data folder ``rows/<name>`` (an image a.png and the metadata.jsonl of ROWS[name])."""
    return toy(f"--data.path={{rows}}/{name}")


# metadata.jsonl contents, each with one bad line after a good one (the message must name line 2)
ROWS = {
    "image null": b'{"file_name": "a.png", "text": "x"}\n{"file_name": null, "text": "y"}\n',
    "image number": b'{"file_name": "a.png", "text": "x"}\n{"file_name": 7, "text": "y"}\n',
    "image empty": b'{"file_name": "a.png", "text": "x"}\n{"file_name": "", "text": "y"}\n',
    "line a list": b'{"file_name": "a.png", "text": "x"}\n["a.png", "y"]\n',
    "line a string": b'{"file_name": "a.png", "text": "x"}\n"a.png"\n',
    "caption number": b'{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": 3}\n',
    "caption object": b'{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": {"en": "y"}}\n',
    "caption list of numbers": b'{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": [1, 2]}\n',
    "not utf-8": b'{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "caf\xe9"}\n',
    "image field missing": b'{"file_name": "a.png", "text": "x"}\n{"image": "a.png", "text": "y"}\n',
}

ROW_CASES = [
    Case(
        "metadata image null", rows("image null"), r"metadata.jsonl:2: field 'file_name' must be the image's path.*null"
    ),
    Case("metadata image number", rows("image number"), r"metadata.jsonl:2: field 'file_name' .* got a number"),
    Case("metadata image empty", rows("image empty"), r"metadata.jsonl:2: field 'file_name' .* got a string"),
    Case("metadata line a list", rows("line a list"), r"metadata.jsonl:2: a row must be a JSON object, got a list"),
    Case(
        "metadata line a string", rows("line a string"), r"metadata.jsonl:2: a row must be a JSON object, got a string"
    ),
    Case(
        "metadata caption number", rows("caption number"), r"metadata.jsonl:2: field 'text' must be a string or a list"
    ),
    Case("metadata caption object", rows("caption object"), r"metadata.jsonl:2: field 'text' .* got an object"),
    Case(
        "metadata caption list of numbers", rows("caption list of numbers"), r"metadata.jsonl:2: field 'text' .* a list"
    ),
    Case("metadata not utf-8", rows("not utf-8"), r"metadata.jsonl:2: not UTF-8 \(byte 0xe9"),
    Case(
        "metadata image field missing",
        rows("image field missing"),
        r"metadata.jsonl:2: no 'file_name' field .*image, text",
    ),
    Case("datasets caption column of numbers", toy("--data.path={hf_numbers}"), r"column 'text' .* not text"),
    Case("datasets image column of numbers", toy("--data.path={hf_images}"), r"column 'file_name' .* not images"),
]

TYPED_CONFIG_CASES = [
    Case("seed negative", toy("--train.seed=-1"), r"train.seed must be in \[0, 2\*\*32\), got -1"),
    Case("seed too large", toy("--train.seed=4294967296"), r"train.seed must be in"),
    Case("validation seed negative", toy("--train.validation_seed=-1"), r"train.validation_seed must be in"),
    Case("output_dir empty", toy("--output_dir="), r"output_dir is empty"),
    Case("output_dir blank", toy("--output_dir= "), r"output_dir is empty"),
    Case(
        "lcm lora alpha zero", recipe("lcm_lora/debug", "--method.lora_alpha=0"), r"method.lora_alpha must be positive"
    ),
    Case("lcm lora alpha negative", recipe("lcm_lora/debug", "--method.lora_alpha=-1"), r"method.lora_alpha must be"),
    Case("lora alpha zero", recipe("lora/debug", "--method.lora_alpha=0"), r"method.lora_alpha must be positive"),
    Case("bucket step not a multiple of 8", toy("--data.bucket_step=12"), r"data.bucket_step=12 .* multiple of 8"),
    Case("bucket step 4", toy("--data.buckets=true", "--data.bucket_step=4"), r"data.bucket_step=4"),
    Case("weight decay 1e999", toy("--train.adam_weight_decay=1e999"), r"train.adam_weight_decay must be a finite"),
    Case("w_min 1e999", recipe("lcm_lora/debug", "--method.w_min=1e999"), r"method.w_min must be a finite number"),
    Case("huber c 1e999", recipe("lcm_lora/debug", "--method.huber_c=1e999"), r"method.huber_c must be a finite"),
    Case("tag dropout -1e999", toy("--data.tag_dropout=-1e999"), r"data.tag_dropout must be a finite"),
    Case("recipe with .nan", lambda p: ["train", str(p["nan_recipe"])], r"train.adam_weight_decay must be a finite"),
    Case("recipe binary", lambda p: ["train", str(p["binary_recipe"])], r"binary.yaml: not a text file \(byte 0x89"),
    Case("recipe latin-1", lambda p: ["train", str(p["latin1_recipe"])], r"latin1.yaml: not a text file"),
]

CHECKPOINT_CASES = [
    Case("resume_from not a checkpoint", toy("--train.resume_from={empty}"), r"is not an ldmkit checkpoint"),
    Case("resume_from damaged", toy("--train.resume_from={damaged}"), r"is damaged: trainable_0.safetensors"),
    Case("changed config", toy("--output_dir={finished}", "--method.width=4"), r"method.width: 16 -> 4"),
    Case("max_steps below checkpoint", toy("--output_dir={finished}", "--train.max_steps=1"), r"below the step"),
    Case(
        "resume_from with a flipped byte",
        toy("--train.resume_from={flipped}"),
        r"is damaged: trainable_0.safetensors does not match its checksum",
    ),
    Case(
        "resume_from with a flipped state",
        toy("--train.resume_from={flipped_state}"),
        r"is damaged: trainer_state.json does not match its checksum",
    ),
    Case(
        "generate on an export with a flipped byte",
        lambda p: ["generate", "--model", str(p["flipped_export"]), "--prompt", "x", "--out", str(p["tmp"] / "g")],
        r"--model .* is damaged: toy.safetensors does not match its checksum",
    ),
    Case(
        "evaluate an export with a flipped byte",
        lambda p: ["evaluate", "--model", str(p["flipped_export"]), "--shapes", "--out", str(p["tmp"] / "e")],
        r"--model .* is damaged: toy.safetensors does not match its checksum",
    ),
    Case(
        "merge a lora export with a flipped byte",
        lambda p: [
            "merge-lora",
            "--model",
            str(p["sd15"]),
            "--lora",
            str(p["flipped_export"]),
            "--out",
            str(p["tmp"] / "m"),
        ],
        r"--lora .* is damaged: toy.safetensors",
    ),
]

MODEL_CASES = [
    Case(
        "sdxl recipe on an sd15 model", recipe("lcm_lora/debug_sdxl", "--model.pretrained={sd15}"), r"model.family=sdxl"
    ),
    Case("sd15 recipe on an sdxl model", recipe("lora/debug", "--model.pretrained={sdxl}"), r"model.family=sd: .*SDXL"),
    Case(
        "resolution the unet cannot take",
        recipe("lora/debug", "--model.pretrained={sd15}", "--data.resolution=36"),
        r"data.resolution=36 is not a multiple of",
    ),
    Case(
        "sd15 unet with an sdxl vae",
        recipe("lcm_lora/debug", "--model.pretrained={sd15}", "--model.vae={sdxl}"),
        r"model.vae has scaling_factor .* mis-scaled",
    ),
    Case(
        "features of another resolution",
        recipe("uvit/debug", "--data.path={features256}"),
        r"prepared at 256 px but data.resolution=",
    ),
]


def merge(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: ["merge-lora", *[e.format(**p) for e in extra]]


COMMAND_CASES = [
    Case(
        "merge out is the model", merge("--model={sd15}", "--lora={lora}", "--out={sd15}"), r"is, or is inside, --model"
    ),
    Case(
        "merge out inside the model",
        merge("--model={sd15}", "--lora={lora}", "--out={sd15}/merged"),
        r"is, or is inside, --model",
    ),
    Case("merge out is a file", merge("--model={sd15}", "--lora={lora}", "--out={file}"), r"--out .* is a file"),
    Case(
        "merge scale nan", merge("--model={sd15}", "--lora={lora}", "--out={tmp}/m", "--scale=nan"), r"--scale must be"
    ),
    Case(
        "merge timestep scaling nan",
        merge("--model={sd15}", "--lora={lora}", "--out={tmp}/m", "--scheduler=lcm", "--timestep-scaling=nan"),
        r"--timestep-scaling must be a positive finite number, got nan",
    ),
    Case(
        "merge timestep scaling zero",
        merge("--model={sd15}", "--lora={lora}", "--out={tmp}/m", "--timestep-scaling=0"),
        r"--timestep-scaling must be a positive finite",
    ),
    Case(
        "merge original steps zero",
        merge("--model={sd15}", "--lora={lora}", "--out={tmp}/m", "--original-inference-steps=0"),
        r"--original-inference-steps must be >= 1, got 0",
    ),
    Case("merge lora empty", merge("--model={sd15}", "--lora={empty_lora}", "--out={tmp}/m"), r"is empty \(0 bytes\)"),
    Case(
        "merge lora garbage",
        merge("--model={sd15}", "--lora={garbage_lora}", "--out={tmp}/m"),
        r"is not a readable safetensors file",
    ),
    Case(
        "merge lora truncated",
        merge("--model={sd15}", "--lora={truncated_lora}", "--out={tmp}/m"),
        r"is not a readable safetensors file",
    ),
    Case(
        "merge lora of another model",
        merge("--model={sd15}", "--lora={foreign_lora}", "--out={tmp}/m"),
        r"down_blocks.9",
    ),
    Case("merge model missing", merge("--model=/no/such/model", "--lora={lora}", "--out={tmp}/m"), r"/no/such/model"),
    Case("merge lora missing", merge("--model={sd15}", "--lora=/no/such.safetensors", "--out={tmp}/m"), r"not found"),
    Case(
        "convert lora garbage",
        lambda p: [
            "convert-lora",
            "--in",
            str(p["garbage_lora"]),
            "--to",
            "kohya",
            "--out",
            str(p["tmp"] / "k.safetensors"),
        ],
        r"is not a readable safetensors file",
    ),
]


def gen(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: ["generate", "--model", str(p["sd15"]), "--prompt", "x", *[e.format(**p) for e in extra]]


GENERATE_CASES = [
    Case(
        "convert lora of another model",
        lambda p: [
            "convert-lora",
            "--in",
            str(p["foreign_lora"]),
            "--to",
            "kohya",
            "--model",
            str(p["sd15"]),
            "--out",
            str(p["tmp"] / "k.safetensors"),
        ],
        r"down_blocks.9",
    ),
    Case("generate lora scale nan", gen("--out={tmp}/g", "--lora-scale=nan"), r"--lora-scale must be a finite"),
    Case("generate guidance inf", gen("--out={tmp}/g", "--guidance=inf"), r"--guidance must be a finite"),
    Case("generate too many ddim steps", gen("--out={tmp}/g", "--scheduler=ddim", "--steps=1000"), r"1\.\.999 steps"),
    Case("generate height not a multiple", gen("--out={tmp}/g", "--height=33"), r"--height must be a multiple of"),
    Case("generate width too small", gen("--out={tmp}/g", "--width=4"), r"--width must be a multiple of"),
    Case("generate out is a file", gen("--out={file}"), r"--out .* is a file"),
    Case("generate steps zero", gen("--out={tmp}/g", "--steps=0"), r"--steps"),
    Case("generate lora of another model", gen("--out={tmp}/g", "--lora={foreign_lora}"), r"down_blocks.9"),
    Case("generate lora garbage", gen("--out={tmp}/g", "--lora={garbage_lora}"), r"not a readable safetensors"),
    Case(
        "generate model missing",
        lambda p: ["generate", "--model", "/no/model", "--prompt", "x", "--out", "g"],
        r"/no/model",
    ),
    Case(
        "evaluate too many steps",
        lambda p: [
            "evaluate",
            "--model",
            str(p["sd15"]),
            "--shapes",
            "--steps",
            "1,1000",
            "--scheduler",
            "ddim",
            "--out",
            str(p["tmp"] / "e"),
        ],
        r"1\.\.999 steps",
    ),
    Case(
        "evaluate bad steps",
        lambda p: ["evaluate", "--model", str(p["sd15"]), "--shapes", "--steps", "1,x", "--out", str(p["tmp"] / "e")],
        r"--steps must be comma-separated integers",
    ),
]


def evaluate(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: ["evaluate", "--model", str(p["sd15"]), "--shapes", *[e.format(**p) for e in extra]]


def features(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: [
        "prepare",
        "features",
        "--model",
        str(p["sd15"]),
        "--data",
        str(p["shapes"]),
        *[e.format(**p) for e in extra],
    ]


def quickstart(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda p: ["quickstart", "--quick", *[e.format(**p) for e in extra]]


# Arguments typed where they enter (ldmkit.inputs): devices, finite numbers, sizes, paths, output places.
ARGUMENT_CASES = [
    Case("generate device cuda without cuda", gen("--out={tmp}/g", "--device=cuda:99"), r"--device cuda:99: .*CUDA"),
    Case("generate device foo", gen("--out={tmp}/g", "--device=foo"), r"--device 'foo' is not a device torch knows"),
    Case("generate device mps", gen("--out={tmp}/g", "--device=mps"), r"--device mps: no mps device"),
    Case(
        "generate seed 2**64", gen("--out={tmp}/g", "--seed=18446744073709551616"), r"--seed must be in \[0, 2\*\*63\)"
    ),
    Case("generate seed negative", gen("--out={tmp}/g", "--seed=-1"), r"--seed must be in \[0, 2\*\*63\), got -1"),
    Case("evaluate seed 2**64", evaluate("--seed=18446744073709551616", "--out={tmp}/e"), r"--seed must be in"),
    Case(
        "tiny model seed 2**64",
        lambda p: ["tiny-model", "--arch", "sd15", "--seed", str(2**64), "--out", str(p["tmp"] / "t")],
        r"--seed must be in",
    ),
    Case("generate width 1e8", gen("--out={tmp}/g", "--width=100000000"), r"--width 100000000 would need about"),
    Case("generate height 1e6", gen("--out={tmp}/g", "--height=1000000", "--width=1000000"), r"GiB to decode"),
    Case("generate height negative", gen("--out={tmp}/g", "--height=-64"), r"--height must be positive"),
    Case("generate lora missing", gen("--out={tmp}/g", "--lora=/no/such/lora"), r"/no/such/lora"),
    Case("evaluate guidance nan", evaluate("--guidance=nan", "--out={tmp}/e"), r"--guidance must be a finite number"),
    Case("evaluate teacher guidance inf", evaluate("--teacher-guidance=inf", "--out={tmp}/e"), r"--teacher-guidance"),
    Case(
        "evaluate feature net missing",
        evaluate("--feature-net=/no/net.pt", "--out={tmp}/e"),
        r"--feature-net /no/net.pt not found",
    ),
    Case(
        "evaluate feature net a folder",
        evaluate("--feature-net={empty}", "--out={tmp}/e"),
        r"--feature-net .* is a folder",
    ),
    Case("evaluate clip missing", evaluate("--clip=/no/clip", "--out={tmp}/e"), r"--clip-model /no/clip not found"),
    Case(
        "evaluate clip model not in the HF cache",
        evaluate("--metrics=clip_score", "--clip-model=nobody-here/no-such-clip", "--out={tmp}/e"),
        r"--clip-model nobody-here/no-such-clip is not in the Hugging Face cache: download it once with",
    ),
    Case(
        "evaluate unknown metric",
        evaluate("--metrics=fid,is", "--out={tmp}/e"),
        r"--metrics: unknown metric\(s\) \['is'\]",
    ),
    Case(
        "evaluate fid without reference images",
        evaluate("--metrics=fid", "--out={tmp}/e"),
        r"--metrics fid needs reference images: pass --reference",
    ),
    Case(
        "evaluate fid weights missing",
        evaluate("--metrics=fid", "--reference={shapes}", "--fid-weights=/no/inception.pth", "--out={tmp}/e"),
        r"--fid-weights /no/inception.pth not found \(the Inception-v3 FID weights",
    ),
    Case("evaluate device foo", evaluate("--device=foo", "--out={tmp}/e"), r"--device 'foo'"),
    Case("evaluate width 1e8", evaluate("--width=100000000", "--out={tmp}/e"), r"would need about"),
    Case("evaluate out is a file", evaluate("--out={file}"), r"--out .* is a file; give a folder"),
    Case(
        "features resolution 100",
        features("--resolution=100", "--out={tmp}/f"),
        r"--resolution must be a positive multiple of 8",
    ),
    Case(
        "features resolution 4",
        features("--resolution=4", "--out={tmp}/f"),
        r"--resolution must be a positive multiple",
    ),
    Case("features batch size zero", features("--batch-size=0", "--out={tmp}/f"), r"--batch-size must be >= 1"),
    Case("features max samples zero", features("--max-samples=0", "--out={tmp}/f"), r"--max-samples must be >= 1"),
    Case("features device foo", features("--device=foo", "--out={tmp}/f"), r"--device 'foo'"),
    Case(
        "features model missing",
        lambda p: [
            "prepare",
            "features",
            "--model",
            "/no/model",
            "--data",
            str(p["shapes"]),
            "--out",
            str(p["tmp"] / "f"),
        ],
        r"--model /no/model not found",
    ),
    Case("features out is a file", features("--out={file}"), r"--out .* is a file; give a folder"),
    Case(
        "quickstart minutes nan", quickstart("--minutes=nan", "--out={tmp}/q"), r"--minutes must be a positive finite"
    ),
    Case(
        "quickstart minutes inf", quickstart("--minutes=inf", "--out={tmp}/q"), r"--minutes must be a positive finite"
    ),
    Case("quickstart minutes negative", quickstart("--minutes=-1", "--out={tmp}/q"), r"--minutes must be a positive"),
    Case("quickstart out is a file", quickstart("--out={file}"), r"--out .* is a file; give a folder"),
    Case("tiny model out is a file", lambda p: ["tiny-model", "--arch", "sd15", "--out", str(p["file"])], r"is a file"),
    Case(
        "tiny model out under a file",
        lambda p: ["tiny-model", "--arch", "sd15", "--out", str(p["file"] / "m")],
        r"a_file is a file, not a folder",
    ),
    Case(
        "synth size 1e6",
        lambda p: ["data", "synth", "--num", "1", "--size", "1000000", "--out", str(p["tmp"] / "d")],
        r"--size 1000000 would need about",
    ),
    Case("features resolution 1e6", features("--resolution=1000000", "--out={tmp}/f"), r"would need about .* GiB"),
    Case("synth out is a file", lambda p: ["data", "synth", "--num", "2", "--out", str(p["file"])], r"is a file"),
    Case(
        "tiny model read-only place",
        lambda p: ["tiny-model", "--arch", "sd15", "--out", str(p["readonly"] / "m")],
        r"cannot write in",
    ),
    Case(
        "synth read-only place",
        lambda p: ["data", "synth", "--num", "2", "--out", str(p["readonly"] / "d")],
        r"cannot write in",
    ),
    Case("generate read-only place", gen("--out={readonly}/g"), r"cannot write in"),
    Case("train read-only place", toy("--output_dir={readonly}/run"), r"output_dir .*run: cannot write there"),
    Case(
        "train output_dir under a file", toy("--output_dir={file}/run"), r"output_dir .*a_file/run: cannot write there"
    ),
    Case(
        "convert model empty safetensors",
        lambda p: ["convert-model", "--in", str(p["empty_lora"]), "--to", "diffusers", "--out", str(p["tmp"] / "c")],
        r"--in .* is empty \(0 bytes\)",
    ),
    Case(
        "generate model empty safetensors",
        lambda p: ["generate", "--model", str(p["empty_lora"]), "--prompt", "x", "--out", str(p["tmp"] / "g")],
        r"checkpoint .*empty.safetensors is empty \(0 bytes\)",
    ),
    Case(
        "evaluate model garbage safetensors",
        lambda p: ["evaluate", "--model", str(p["garbage_lora"]), "--shapes", "--out", str(p["tmp"] / "e")],
        r"checkpoint .*garbage.safetensors is not a readable safetensors file",
    ),
    Case(
        "merge model truncated safetensors",
        merge("--model={truncated_lora}", "--lora={lora}", "--out={tmp}/m"),
        r"checkpoint .*truncated.safetensors is not a readable",
    ),
    Case(
        "train on an empty safetensors",
        recipe("lora/debug", "--model.pretrained={empty_lora}"),
        r"empty.safetensors is empty \(0 bytes\)",
    ),
    Case(
        "convert model garbage safetensors",
        lambda p: ["convert-model", "--in", str(p["garbage_lora"]), "--to", "diffusers", "--out", str(p["tmp"] / "c")],
        r"--in .* is not a readable safetensors file",
    ),
    Case(
        "convert model single file to a folder path",
        lambda p: ["convert-model", "--in", str(p["sd15"]), "--to", "single-file", "--out", str(p["empty"])],
        r"must end in .safetensors",
    ),
]

CASES = (
    CONFIG_CASES
    + TYPED_CONFIG_CASES
    + DATA_CASES
    + ROW_CASES
    + CHECKPOINT_CASES
    + MODEL_CASES
    + COMMAND_CASES
    + GENERATE_CASES
    + ARGUMENT_CASES
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, shapes_folder, tiny_sd15, tiny_sdxl) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    p = {"shapes": shapes_folder, "root": root, "sd15": tiny_sd15, "sdxl": tiny_sdxl}
    import torch
    from safetensors.torch import save_file

    lora = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2),
    }
    save_file(lora, str(root / "lora.safetensors"))
    p["lora"] = root / "lora.safetensors"
    foreign = {k.replace("down_blocks.0", "down_blocks.9"): v for k, v in lora.items()}
    save_file(foreign, str(root / "foreign.safetensors"))
    p["foreign_lora"] = root / "foreign.safetensors"
    (root / "empty.safetensors").write_bytes(b"")
    p["empty_lora"] = root / "empty.safetensors"
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 100)
    p["garbage_lora"] = root / "garbage.safetensors"
    data = p["lora"].read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    p["truncated_lora"] = root / "truncated.safetensors"
    (root / "features256").mkdir()
    (root / "features256" / "meta.json").write_text(json.dumps({"resolution": 256}))
    p["features256"] = root / "features256"
    (root / "a_file").write_text("not a folder")
    p["file"] = root / "a_file"
    p["no_method"] = root / "no_method.yaml"
    p["no_method"].write_text("train:\n  max_steps: 3\n")
    p["a_list"] = root / "list.yaml"
    p["a_list"].write_text("- method\n- train\n")
    p["bad_yaml"] = root / "bad.yaml"
    p["bad_yaml"].write_text("method:\n  name: [toy\n")
    p["typo_recipe"] = root / "typo.yaml"
    p["typo_recipe"].write_text("method:\n  name: toy\nmodel:\n  pretraind: x\n")
    (root / "empty").mkdir()
    p["empty"] = root / "empty"
    meta = root / "bad_metadata"
    meta.mkdir()
    Image.new("RGB", (16, 16)).save(meta / "a.png")
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": \n')
    p["bad_metadata"] = meta
    col = root / "no_column"
    col.mkdir()
    Image.new("RGB", (16, 16)).save(col / "a.png")
    (col / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "x"}\n')
    p["no_column"] = col
    broken = root / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    p["broken"] = broken
    outside = root / "outside"
    outside.mkdir()
    Image.new("RGB", (16, 16), "red").save(outside / "secret.png")
    esc = root / "escaping"
    esc.mkdir()
    (esc / "metadata.jsonl").write_text(
        json.dumps({"file_name": "../outside/secret.png", "text": "x"})
        + "\n"
        + json.dumps({"file_name": str(outside / "secret.png"), "text": "y"})
        + "\n"
    )
    p["escaping"] = esc

    # a finished 2-step toy run, and a copy of its checkpoint with a truncated weight file
    assert main(toy()(p | {"tmp": root / "fin"})) == 0
    p["finished"] = root / "fin" / "run"
    import shutil

    damaged = root / "damaged"
    shutil.copytree(p["finished"] / "checkpoints" / "step-0000002", damaged)
    data = (damaged / "trainable_0.safetensors").read_bytes()
    (damaged / "trainable_0.safetensors").write_bytes(data[: len(data) // 2])
    p["damaged"] = damaged
    # the same checkpoint and the run's export with one byte inverted (same size: only checksums see it)
    for name, source, file in (
        ("flipped", p["finished"] / "checkpoints" / "step-0000002", "trainable_0.safetensors"),
        ("flipped_state", p["finished"] / "checkpoints" / "step-0000002", "trainer_state.json"),
        ("flipped_export", p["finished"] / "export", "toy.safetensors"),
    ):
        shutil.copytree(source, root / name)
        flip(root / name / file) if file != ckpt.STATE_FILE else edit_state(root / name / file)
        p[name] = root / name

    rows = root / "rows"
    for name, text in ROWS.items():
        (rows / name).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(rows / name / "a.png")
        (rows / name / "metadata.jsonl").write_bytes(text)
    p["rows"] = rows
    import datasets

    Image.new("RGB", (16, 16)).save(root / "hf.png")
    datasets.Dataset.from_dict({"file_name": [str(root / "hf.png")], "text": [3]}).save_to_disk(root / "hf_numbers")
    p["hf_numbers"] = root / "hf_numbers"
    datasets.Dataset.from_dict({"file_name": [1], "text": ["x"]}).save_to_disk(root / "hf_images")
    p["hf_images"] = root / "hf_images"
    p["binary_recipe"] = root / "binary.yaml"
    p["binary_recipe"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    p["latin1_recipe"] = root / "latin1.yaml"
    p["latin1_recipe"].write_bytes("method:\n  name: toy\n# caf\xe9\n".encode("latin-1"))
    p["nan_recipe"] = root / "nan.yaml"
    p["nan_recipe"].write_text(
        f"method:\n  name: toy\ndata:\n  path: {shapes_folder}\ntrain:\n  adam_weight_decay: .nan\n"
    )
    p["readonly"] = read_only_folder(root)
    return p


def flip(path: Path, at: float = 0.5) -> None:
    """Invert one byte at fraction ``at`` of the file; the size stays."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_state(path: Path) -> None:
    """trainer_state.json still valid JSON, of the same size, but saying step 3: its own checksum finds it."""
    text = path.read_text()
    assert '"step": 2' in text
    path.write_text(text.replace('"step": 2', '"step": 3'))


def read_only_folder(root: Path) -> Path:
    """A folder nobody may create entries in: chmod 555, or for root (whom permissions do not stop) a
    place under /sys, where the kernel refuses new entries to anyone."""
    ro = root / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").mkdir()
    except OSError:
        return ro
    (ro / "probe").rmdir()
    return Path("/sys/ldmkit-read-only")


def test_the_table_is_large_enough():
    assert len(CASES) >= 160, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gives_one_line_and_exit_2(case, paths, tmp_path, capsys):
    argv = case.argv(paths | {"tmp": tmp_path})
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ldmkit: error: ")]
    assert code == 2, (argv, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    import re

    assert re.search(case.expect, lines[0]), lines[0]
    assert "\n" not in lines[0].strip()


def test_escaping_paths_are_refused_and_counted(paths, caplog):
    """A metadata.jsonl entry outside the folder is never read, even when others are fine."""
    from ldmkit.config import DataConfig
    from ldmkit.data.folder import FolderDataset

    mixed = paths["root"] / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16), "blue").save(mixed / "ok.png")
    (mixed / "link.png").symlink_to(paths["root"] / "outside" / "secret.png")
    rows = [{"file_name": "ok.png", "text": "ok"}, {"file_name": "../outside/secret.png", "text": "no"}]
    rows += [{"file_name": "link.png", "text": "no"}, {"file_name": "/etc/passwd", "text": "no"}]
    (mixed / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = FolderDataset(mixed, DataConfig(path=str(mixed), resolution=16))
    assert len(ds) == 1 and ds.refused == 3 and ds.key(0) == "ok"
    assert "3 image paths lead outside the data folder" in caplog.text
    # the same for a symlink in a sidecar folder
    (mixed / "metadata.jsonl").unlink()
    ds = FolderDataset(mixed, DataConfig(path=str(mixed), resolution=16))
    assert [ds.key(i) for i in range(len(ds))] == ["ok"] and ds.refused == 1


def test_16_bit_and_float_images_decode_to_8_bit(tmp_path):
    """A 16-bit PNG used to turn pure white (Pillow clips I;16 at 255 in convert("RGB"))."""
    import numpy as np

    from ldmkit.data.transforms import decode_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(decode_image(tmp_path / "g16.png"))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[..., 0], np.rint(ramp / 257.0), atol=1)
    assert out.min() == 0 and 240 < out.max() < 255
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(tmp_path / "f.tiff")
    np.testing.assert_allclose(np.asarray(decode_image(tmp_path / "f.tiff"))[..., 0], np.rint(ramp / 257.0), atol=1)


def test_captions_in_another_encoding_keep_their_image_and_are_counted(tmp_path, caplog):
    from ldmkit.config import DataConfig
    from ldmkit.data.loader import build_loader

    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
        caption = f"caf\xe9 {i}".encode("latin-1") if i % 2 else f"plain {i}".encode()
        (tmp_path / f"{i}.txt").write_bytes(caption)
    cfg = DataConfig(path=str(tmp_path), resolution=16, num_workers=0)
    loader = build_loader(cfg, batch_size=4, seed=0)
    batch = next(loader)
    assert sorted(batch["key"]) == ["0", "1", "2", "3"]  # no image dropped
    assert loader.replaced_captions == 2 and loader.skipped == 0
    assert sum("caf\ufffd" in c for c in batch["captions"]) == 2
    assert "2 captions so far were not UTF-8" in caplog.text
    loader.close()


# ---- outputs: nothing of the user's is replaced without --overwrite (ldmkit.outputs) ------------------------
def victims(tmp: Path, p: dict[str, Path]) -> dict[str, Path]:
    """The user's things a command could write over, all under ``tmp``: a folder, a .safetensors file, a
    file without suffix, another LoRA (file and folder), a copy of a model folder, a folder with a run's names."""
    import shutil

    v = {"dir": tmp / "mine", "st": tmp / "mine.safetensors", "txt": tmp / "mine.txt"}
    (v["dir"] / "sub").mkdir(parents=True)
    (v["dir"] / "notes.txt").write_text("my notes")
    (v["dir"] / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    v["st"].write_bytes(p["lora"].read_bytes())
    v["txt"].write_text("my file")
    v["st_dir"] = tmp / "folder.safetensors"
    v["st_dir"].mkdir()
    (v["st_dir"] / "inside.txt").write_text("mine")
    v["lora_dir"] = tmp / "my_lora"
    v["lora_dir"].mkdir()
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        (v["lora_dir"] / name).write_bytes(p["lora"].read_bytes() + b"")
    v["model"] = tmp / "my_model"
    shutil.copytree(p["sd15"], v["model"])
    v["run"] = tmp / "my_run"
    (v["run"] / "export").mkdir(parents=True)
    (v["run"] / "export" / "model.safetensors").write_bytes(b"weights")
    (v["run"] / "config.yaml").write_text("mine: true\n")
    return v


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: a file's bytes, None for a folder (new or left-over entries show too)."""
    return {q.relative_to(root).as_posix(): q.read_bytes() if q.is_file() else None for q in sorted(root.rglob("*"))}


Argv = Callable[[dict[str, Path]], list[str]]


def cmd(*args: str) -> Argv:
    return lambda p: [a.format(**p) for a in args]


EXISTS = r"already exists and was not written by ldmkit {}: pass --overwrite"
FILE_EXISTS = r"already exists: pass --overwrite to replace it"
IS_A_FILE = r"is a file; give a folder"

# (id, argv, expected message): every command that writes, onto a folder and onto a file of the user's.
OVERWRITE_CASES = [
    (
        "merge-lora --out folder",
        cmd("merge-lora", "--model={sd15}", "--lora={lora}", "--out={dir}"),
        EXISTS.format("merge-lora"),
    ),
    (
        "merge-lora --out another model",
        cmd("merge-lora", "--model={sd15}", "--lora={lora}", "--out={model}"),
        EXISTS.format("merge-lora"),
    ),
    ("merge-lora --out file", cmd("merge-lora", "--model={sd15}", "--lora={lora}", "--out={txt}"), IS_A_FILE),
    (
        "merge-lora --single-file file",
        cmd("merge-lora", "--model={sd15}", "--lora={lora}", "--single-file={st}"),
        FILE_EXISTS,
    ),
    (
        "merge-lora --single-file folder",
        cmd("merge-lora", "--model={sd15}", "--lora={lora}", "--single-file={st_dir}"),
        r"folder.safetensors is a folder; give a file path",
    ),
    ("convert-lora --out file", cmd("convert-lora", "--in={lora}", "--to=kohya", "--out={st}"), FILE_EXISTS),
    ("convert-lora --out is --in", cmd("convert-lora", "--in={st}", "--to=diffusers", "--out={st}"), FILE_EXISTS),
    ("convert-lora --out folder", cmd("convert-lora", "--in={lora}", "--to=kohya", "--out={lora_dir}"), FILE_EXISTS),
    (
        "convert-lora --out folder diffusers",
        cmd("convert-lora", "--in={lora}", "--to=diffusers", "--out={lora_dir}"),
        FILE_EXISTS,
    ),
    (
        "convert-model to folder",
        cmd("convert-model", "--in={sd15}", "--to=diffusers", "--out={dir}"),
        EXISTS.format("convert-model"),
    ),
    (
        "convert-model --out is --in",
        cmd("convert-model", "--in={model}", "--to=diffusers", "--out={model}"),
        EXISTS.format("convert-model"),
    ),
    ("convert-model to file", cmd("convert-model", "--in={sd15}", "--to=single-file", "--out={st}"), FILE_EXISTS),
    (
        "convert-model to diffusers onto a file",
        cmd("convert-model", "--in={sd15}", "--to=diffusers", "--out={txt}"),
        IS_A_FILE,
    ),
    ("tiny-model folder", cmd("tiny-model", "--arch=sd15", "--out={dir}"), EXISTS.format("tiny-model")),
    ("tiny-model another model", cmd("tiny-model", "--arch=sdxl", "--out={model}"), EXISTS.format("tiny-model")),
    ("tiny-model file", cmd("tiny-model", "--arch=sd15", "--out={txt}"), IS_A_FILE),
    ("data synth folder", cmd("data", "synth", "--num=2", "--out={dir}"), EXISTS.format("data synth")),
    ("data synth file", cmd("data", "synth", "--num=2", "--out={txt}"), IS_A_FILE),
    (
        "prepare features folder",
        cmd("prepare", "features", "--model={sd15}", "--data={shapes}", "--out={dir}"),
        EXISTS.format("prepare features"),
    ),
    (
        "prepare features file",
        cmd("prepare", "features", "--model={sd15}", "--data={shapes}", "--out={txt}"),
        IS_A_FILE,
    ),
    ("generate folder", cmd("generate", "--model={sd15}", "--prompt=x", "--out={dir}"), EXISTS.format("generate")),
    ("generate file", cmd("generate", "--model={sd15}", "--prompt=x", "--out={txt}"), IS_A_FILE),
    ("evaluate folder", cmd("evaluate", "--model={sd15}", "--shapes", "--out={dir}"), EXISTS.format("evaluate")),
    ("evaluate file", cmd("evaluate", "--model={sd15}", "--shapes", "--out={txt}"), IS_A_FILE),
    (
        "quickstart folder",
        cmd("quickstart", "--quick", "--out={dir}"),
        r"was not written by ldmkit quickstart: choose another path",
    ),
    ("quickstart file", cmd("quickstart", "--quick", "--out={txt}"), IS_A_FILE),
    (
        "train output_dir of something else",
        toy("--output_dir={run}"),
        r"output_dir .*my_run holds config.yaml but no ldmkit run",
    ),
    ("train output_dir file", toy("--output_dir={txt}"), r"output_dir is a file"),
]


def test_the_overwrite_table_covers_every_command_that_writes():
    """Every command of the CLI writes something: each has a folder target and a file target above."""
    from ldmkit.cli import COMMANDS, GROUPS

    writers = {*COMMANDS, *(f"{g} {c}" for g, cs in GROUPS.items() for c in cs), "train"}
    for name in writers:
        ids = [i for i, *_ in OVERWRITE_CASES if i.startswith(name + " ")]
        assert any("file" in i for i in ids) and len(ids) >= 2, (name, ids)


@pytest.mark.parametrize("case", OVERWRITE_CASES, ids=lambda c: c[0])
def test_the_users_files_are_never_replaced_without_overwrite(case, paths, tmp_path, capsys):
    """exit 2, one line naming the path and the flag, and every byte under the user's folder as before:
    nothing replaced, nothing left behind (no temporary sibling)."""
    import re

    _, argv, expect = case
    p = paths | {"tmp": tmp_path} | victims(tmp_path, paths)
    before = snapshot(tmp_path)
    code = main(argv(p))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ldmkit: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(expect, lines[0]), lines[0]
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_and_a_command_may_rewrite_its_own_output(paths, tmp_path, capsys):
    """--overwrite replaces the user's folder or file (whole: nothing of the old one is left); without it a
    command may write again where it wrote before, recognised by its marker or its own record."""
    from ldmkit.outputs import MARKER

    v = victims(tmp_path, paths)
    assert main(["tiny-model", "--arch", "sd15", "--out", str(v["dir"]), "--overwrite"]) == 0
    assert (v["dir"] / "model_index.json").is_file() and not (v["dir"] / "notes.txt").exists()
    assert json.loads((v["dir"] / MARKER).read_text()) == {"command": "tiny-model"}
    assert main(["tiny-model", "--arch", "sd15", "--out", str(v["dir"]), "--seed", "1"]) == 0  # its own: no flag
    # but another command does not take it for its own
    assert main(["data", "synth", "--num", "2", "--out", str(v["dir"])]) == 2
    assert (
        main(["convert-lora", "--in", str(paths["lora"]), "--to", "kohya", "--out", str(v["st"]), "--overwrite"]) == 0
    )
    assert v["st"].read_bytes() != paths["lora"].read_bytes() and "lora_unet_" in v["st"].read_bytes()[:4000].decode(
        errors="ignore"
    )
    synth = tmp_path / "synth"
    for _ in range(2):
        assert main(["data", "synth", "--num", "3", "--out", str(synth)]) == 0
    assert len(list(synth.glob("*.png"))) == 3
    gen_out = tmp_path / "generated"
    args = ["generate", "--model", str(paths["sd15"]), "--prompt", "x", "--steps", "1", "--out", str(gen_out)]
    assert main(args) == 0
    assert main(args + ["--seed", "1"]) == 0  # re-run into its own output (generate.json is its record)
    assert json.loads((gen_out / "generate.json").read_text())["seed"] == 1
    capsys.readouterr()
    leftovers = [q.name for q in tmp_path.iterdir() if ".tmp-" in q.name or ".old-" in q.name]
    assert leftovers == []


def test_an_interrupted_command_leaves_the_old_output_whole(paths, tmp_path, monkeypatch, capsys):
    """Outputs are written to a temporary sibling and renamed into place: Ctrl-C in the middle of writing
    (here inside build_tiny_pipeline) leaves the user's folder byte for byte, and no temporary folder."""
    import ldmkit.models.tiny as tiny

    v = victims(tmp_path, paths)
    before = snapshot(tmp_path)
    real = tiny.build_tiny_pipeline

    def interrupted(arch, out, seed=0):
        real(arch, out, seed=seed)  # every file written ...
        raise KeyboardInterrupt  # ... and Ctrl-C before the rename

    monkeypatch.setattr(tiny, "build_tiny_pipeline", interrupted)
    assert main(["tiny-model", "--arch", "sd15", "--out", str(v["dir"]), "--overwrite"]) == 130
    assert snapshot(tmp_path) == before
    capsys.readouterr()


def test_staged_file_is_replaced_in_one_rename(tmp_path):
    from ldmkit import outputs

    target = tmp_path / "a.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), outputs.staged(target, "x", kind="file") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors" and tmp != target
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [q.name for q in tmp_path.iterdir()] == ["a.safetensors"]
    with outputs.staged(target, "x", kind="file") as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [q.name for q in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(paths, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(paths["sd15"]),
                "--prompt",
                "x",
                "--device",
                "cuda",
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "ldmkit: error: --device cuda: this machine or this torch build has no CUDA GPU; use cpu or auto"
    )
    assert not (tmp_path / "g").exists()


def test_webdataset_json_of_the_wrong_type_is_an_unreadable_sample():
    """Streaming readers cannot stop at start for one row: a mistyped .json member makes the sample
    unreadable (skipped and counted by the loader) with a message naming the sample and field."""
    import io

    from ldmkit.data.transforms import DECODE_ERRORS
    from ldmkit.data.wds import decode_sample

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    ok = decode_sample({"__key__": "k", "png": png.getvalue(), "json": b'{"text": ["a", "b"]}'})
    assert ok.captions == ["a", "b"]
    for bad, message in ((b'{"text": 5}', "field 'text' must be a string"), (b"[1, 2]", "a row must be a JSON object")):
        with pytest.raises(DECODE_ERRORS, match=rf"sample k.json: {message}"):
            decode_sample({"__key__": "k", "png": png.getvalue(), "json": bad})


def test_a_file_replaced_with_overwrite_inside_an_export_keeps_its_manifest_true(paths, tmp_path, capsys):
    """convert-lora --overwrite onto a file an export's manifest lists: the record follows the new bytes,
    so generate does not take the export for damaged afterwards."""
    import shutil

    from ldmkit.outputs import MANIFEST, verify

    export = tmp_path / "export"
    shutil.copytree(paths["finished"] / "export", export)
    shutil.copy(paths["lora"], export / "toy.safetensors")  # a LoRA where the manifest lists toy.safetensors
    manifest = json.loads((export / MANIFEST).read_text())
    manifest["files"]["toy.safetensors"] = {"size": 0, "xxh3_128": "stale"}
    (export / MANIFEST).write_text(json.dumps(manifest))
    out = str(export / "toy.safetensors")
    assert main(["convert-lora", "--in", out, "--to", "kohya", "--out", out, "--overwrite"]) == 0
    verify(("--model", export))  # no UserError: the record is the new file's
    capsys.readouterr()
