"""What a new user trips over (issue 25, part 7), each tried as a user would: the end-of-run "try it" line,
mistyped model paths, single-file-only repos in the Hugging Face cache, tiny-model's output, the single-file
conversion's progress bar, a one-bucket data.buckets setting, and --tokenizer / --allow-pickle on generate
and evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldmkit.cli import main as cli
from ldmkit.errors import UserError
from ldmkit.families import resolve_model

from helpers.data import data_cfg


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """An empty Hugging Face cache and ldmkit cache per test: nothing from the machine leaks in."""
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "ldmkit-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()


def hf_cache(repo: str, files: Path | list[Path], commit: str = "a" * 40) -> Path:
    """Lay out ``files`` (a folder's content, or single files) as huggingface_hub stores a downloaded repo in
    $HF_HUB_CACHE; returns the snapshot folder."""
    import os

    base = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    if isinstance(files, Path):
        shutil.copytree(files, snap)
    else:
        snap.mkdir(parents=True)
        for f in files:
            shutil.copy(f, snap / f.name)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_sd15) -> Path:
    """tiny_sd15 as one original-layout .safetensors WITHOUT ldmkit's byte-tokenizer marker: like a
    downloaded checkpoint, it needs a tokenizer from --tokenizer or the Hugging Face cache."""
    from diffusers import DiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ldmkit.families.single_file import TOKENIZER_KEY, save_single_file

    root = tmp_path_factory.mktemp("single")
    marked = save_single_file(DiffusionPipeline.from_pretrained(tiny_sd15), root / "marked.safetensors")
    with safe_open(str(marked), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != TOKENIZER_KEY}
    out = root / "tiny-sd15.safetensors"
    save_file(load_file(str(marked)), str(out), metadata=metadata)
    return out


# ---- the "try it" line ---------------------------------------------------------------------------------
def _try_it(tmp_path: Path, **model) -> argparse.Namespace:
    """The "try it" line of a finished LoRA run, parsed by ldmkit generate's own parser."""
    from ldmkit.commands import generate
    from ldmkit.commands.train import run_summary

    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "pytorch_lora_weights.safetensors").write_bytes(b"")
    cfg = SimpleNamespace(
        output_dir=str(tmp_path / "run"),
        method=SimpleNamespace(name="lcm_lora"),
        model=SimpleNamespace(**{"tokenizer": None, "allow_pickle": False, **model}),
        train=SimpleNamespace(validation_prompts=["a red circle"]),
    )
    line = next(x for x in run_summary(cfg, export).splitlines() if x.strip().startswith("try it:"))
    argv = shlex.split(line.split("try it:", 1)[1])
    assert argv[:2] == ["ldmkit", "generate"]
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(argv[2:])


def test_try_it_repeats_a_repo_id_as_typed(tmp_path, monkeypatch, tiny_sd15):
    """A repo id with its revision comes back as typed (not a path under the working folder, nor the cache's
    snapshot folder), and resolves to the cached model again."""
    snap = hf_cache("someone/tiny-sd", tiny_sd15)
    monkeypatch.chdir(tmp_path)
    args = _try_it(tmp_path, pretrained="someone/tiny-sd@main")
    assert args.model == "someone/tiny-sd@main"
    assert args.lora == str((tmp_path / "run" / "export").resolve())
    assert resolve_model(args.model) == snap
    assert args.tokenizer is None and not args.allow_pickle


def test_try_it_gives_local_paths_absolute_with_what_a_single_file_needs(tmp_path, monkeypatch, single_file):
    monkeypatch.chdir(single_file.parent)
    (tmp_path / "tok").mkdir()
    args = _try_it(tmp_path, pretrained=single_file.name, tokenizer=str(tmp_path / "tok"), allow_pickle=True)
    assert args.model == str(single_file.resolve())  # works from any folder
    assert args.tokenizer == str((tmp_path / "tok").resolve()) and args.allow_pickle


# ---- model references ----------------------------------------------------------------------------------
def test_a_mistyped_path_says_no_such_folder_first(tmp_path, monkeypatch, tiny_sd15):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_sd15, tmp_path / "my-model")
    with pytest.raises(UserError) as e:
        resolve_model("./my-modle", what="--model")
    msg = str(e.value)
    assert msg.startswith("--model not found: no folder or file ") and str(tmp_path / "my-modle") in msg
    assert "did you mean my-model?" in msg and "\n" not in msg
    # A relative path that has the form of a repo id: the missing folder first, then the cache.
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError) as e:
        resolve_model("models/sd15")
    msg = str(e.value)
    assert msg.startswith("model.pretrained models/sd15 not found: no folder or file ")
    assert msg.index(str(tmp_path / "models" / "sd15")) < msg.index("Hugging Face cache") and "\n" not in msg
    # Real repo ids keep working, also when a local folder has the owner's name.
    snap = hf_cache("models/tiny-sd", tiny_sd15)
    assert resolve_model("models/tiny-sd") == snap


def test_a_mistyped_model_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli(["generate", "--model", "models/sd15", "--prompt", "x", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("ldmkit: error: --model models/sd15 not found: no folder or file ")


def test_a_single_file_repo_in_the_cache_names_the_file_to_pass(tmp_path, single_file, tiny_sd15):
    snap = hf_cache("someone/dreamshaper", [single_file])
    with pytest.raises(UserError) as e:
        resolve_model("someone/dreamshaper")
    msg = str(e.value)
    assert "not a diffusers folder" in msg and "model_index.json not found" not in msg and "\n" not in msg
    offered = msg.rsplit(": ", 1)[1]
    assert offered == str(snap / single_file.name)
    # ... and the file offered is a model reference that works (with a tokenizer: the file has none).
    folder = resolve_model(offered, tokenizer=str(tiny_sd15))
    assert (folder / "model_index.json").is_file()


def test_a_local_folder_of_single_files_names_them(tmp_path, single_file):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    shutil.copy(single_file, folder / "a.safetensors")
    shutil.copy(single_file, folder / "b.safetensors")
    with pytest.raises(
        UserError, match=r"the folder is not a diffusers folder .*: .*a\.safetensors, .*b\.safetensors$"
    ):
        resolve_model(folder)


# ---- output a user sees ----------------------------------------------------------------------------------
def test_tiny_model_says_what_it_wrote_once(tmp_path, capsys):
    assert cli(["tiny-model", "--arch", "sd15", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if str(tmp_path / "m") in x]
    assert lines == [f"tiny sd15 pipeline written to {tmp_path / 'm'}"]


def test_single_file_conversion_shows_no_component_bar(tmp_path, single_file, tiny_sd15, capsys):
    from diffusers.utils import logging as dlogging

    dlogging.enable_progress_bar()  # as in a fresh process (the CLI's load_pipeline switches it off for good)
    folder = resolve_model(single_file, tokenizer=str(tiny_sd15))
    assert (folder / "model_index.json").is_file()
    assert "Loading pipeline components" not in capsys.readouterr().err
    assert dlogging.is_progress_bar_enabled()  # diffusers' global switch is left as it was


def test_one_bucket_is_said_once(caplog, tmp_path, monkeypatch):
    from ldmkit.data import buckets

    monkeypatch.setattr(buckets, "_WARNED_SINGLE", set())
    cfg = data_cfg(tmp_path, buckets=True, resolution=64, bucket_step=64)
    with caplog.at_level(logging.WARNING, logger="ldmkit.data.buckets"):
        for _ in range(3):  # the loader and the methods' validation size each build them
            assert buckets.Buckets.from_config(cfg).sizes == [(64, 64)]
    warned = [r.getMessage() for r in caplog.records if "one bucket" in r.getMessage()]
    assert len(warned) == 1
    assert "data.resolution 64" in warned[0] and "at least 128" in warned[0]
    assert len(buckets.Buckets(128, 64).sizes) > 1  # the advice holds
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldmkit.data.buckets"):
        buckets.Buckets.from_config(data_cfg(tmp_path, buckets=True, resolution=128, bucket_step=64))
    assert not caplog.records


# ---- --tokenizer and --allow-pickle on generate and evaluate -----------------------------------------------
def test_generate_takes_a_tokenizer_for_a_single_file(tmp_path, single_file, tiny_sd15, capsys):
    base = ["generate", "--model", str(single_file), "--prompt", "a red circle", "--steps", "1", "--device", "cpu"]
    assert cli([*base, "--out", str(tmp_path / "no")]) == 2  # no tokenizer in the file, nor in the cache
    assert "no tokenizer" in capsys.readouterr().err
    assert cli([*base, "--tokenizer", str(tiny_sd15), "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "grid.png").is_file()


def test_generate_passes_allow_pickle(tmp_path, single_file, tiny_sd15, capsys):
    from safetensors.torch import load_file

    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(single_file))}, ckpt)
    base = [
        "generate",
        "--model",
        str(ckpt),
        "--tokenizer",
        str(tiny_sd15),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "g"),
    ]
    assert cli(base) == 2
    assert "pickle" in capsys.readouterr().err
    # Let through, the pickle is read: a pickle carries no configs, and the tiny weights do not fit the released ones.
    assert cli([*base, "--allow-pickle"]) == 2
    assert "released SD1.x architecture" in capsys.readouterr().err


def test_evaluate_takes_a_tokenizer_for_a_single_file(tmp_path, single_file, tiny_sd15, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    base = ["evaluate", "--model", str(single_file), "--prompts", str(prompts), "--steps", "1", "--num-images", "2"]
    base += ["--no-caption-adherence", "--device", "cpu"]
    assert cli([*base, "--out", str(tmp_path / "no")]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert cli([*base, "--tokenizer", str(tiny_sd15), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["model"] == str(single_file)
