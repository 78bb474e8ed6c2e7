"""Model references as users have them (issue 11): single-file SD1.x / SD2.x-v / SDXL checkpoints written
from the tiny pipelines and read back offline, cached Hugging Face repo ids, training from a single file,
``merge-lora --single-file`` and ``convert-model``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ldmkit.commands import convert_model, merge_lora
from ldmkit.errors import UserError
from ldmkit.families import SDFamily, SDXLFamily, detect_family, resolve_model
from ldmkit.families.configs import KINDS, released_configs
from ldmkit.families.single_file import detect_kind, unet_to_original

from helpers.sd import pinned_threads  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def ldmkit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "ldmkit-cache"))


def cmd(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv)) or 0


@pytest.fixture(scope="module")
def single_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{arch: (tiny diffusers folder, the same model as one .safetensors written by convert-model)}."""
    from ldmkit.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("single")
    out = {}
    for arch in ("sd15", "sd2v", "sdxl"):
        folder = build_tiny_pipeline(arch, root / arch)
        file = root / f"{arch}.safetensors"
        assert cmd(convert_model, ["--in", str(folder), "--to", "single-file", "--out", str(file)]) == 0
        out[arch] = (folder, file)
    return out


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.mark.parametrize("arch,kind", [("sd15", "sd1"), ("sd2v", "sd2-v"), ("sdxl", "sdxl")])
def test_single_file_is_detected_and_round_trips(single_files, arch, kind, tmp_path, caplog):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    folder, file = single_files[arch]
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
    # original layout, as A1111 / ComfyUI read it
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    assert ("v_pred" in keys) == (arch == "sd2v")
    assert detect_kind(keys) == kind  # from the keys alone (SD2 without configs: v-prediction by default)
    with caplog.at_level("INFO"):
        assert detect_family(file) is (SDXLFamily if arch == "sdxl" else SDFamily)
    assert "detected a" in caplog.text
    # folder -> single file -> folder gives the same weights and scheduler
    assert cmd(convert_model, ["--in", str(file), "--to", "diffusers", "--out", str(tmp_path / "back")]) == 0
    a, b = DiffusionPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(tmp_path / "back")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is not None:
            _same_weights(getattr(a, name), getattr(b, name))
    assert b.scheduler.config.prediction_type == a.scheduler.config.get("prediction_type", "epsilon")
    assert type(b).__name__ == type(a).__name__


def test_released_configs_fit_the_released_checkpoints():
    """The shipped configs build UNets whose original-layout names include the keys diffusers' model-type
    detection looks for (single_file_utils.CHECKPOINT_KEY_NAMES), at the right widths."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    for kind in KINDS:
        cfg = released_configs(kind)["unet/config.json"]
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(cfg)
        sd = unet_to_original(unet.state_dict(), dict(unet.config))
        if kind == "sd1":
            assert CHECKPOINT_KEY_NAMES["v1"] in sd
        elif kind.startswith("sd2"):
            assert sd[CHECKPOINT_KEY_NAMES["v2"]].shape[-1] == 1024
        else:
            assert "model.diffusion_model.label_emb.0.0.weight" in sd and len(sd) == 1680


def test_pickles_need_an_opt_in(tmp_path, single_files):
    from safetensors.torch import load_file

    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(str(single_files["sd15"][1]))}, ckpt)
    with pytest.raises(UserError, match="allow_pickle"):
        resolve_model(ckpt)
    with pytest.raises(UserError, match="no tokenizer"):  # no metadata in a pickle: the tokenizer is not known
        resolve_model(ckpt, allow_pickle=True)
    # nor the tiny configs: the released SD1.x configs are used, which do not fit, in one line
    with pytest.raises(UserError, match="released SD1.x architecture"):
        resolve_model(ckpt, allow_pickle=True, tokenizer=str(single_files["sd15"][0]))


def _hf_cache(cache: Path, repo: str, folder: Path, commit: str = "a" * 40) -> None:
    """Lay ``folder`` out as huggingface_hub stores a downloaded repo."""
    import shutil

    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_repo_ids_resolve_from_the_local_cache(tmp_path, monkeypatch, single_files):
    cache = tmp_path / "hub"
    _hf_cache(cache, "someone/tiny-sd", single_files["sd15"][0])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert (resolve_model("someone/tiny-sd") / "model_index.json").is_file()
    assert resolve_model(f"someone/tiny-sd@{'a' * 40}") == resolve_model("someone/tiny-sd")
    with pytest.raises(UserError) as e:
        resolve_model("someone/not-there")
    assert "not in the Hugging Face cache" in str(e.value) or "Hugging Face cache" in str(e.value)
    assert "\n" not in str(e.value)
    from ldmkit.inference import load_pipeline

    assert type(load_pipeline("someone/tiny-sd")).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("arch,name", [("sd15", "lcm_lora"), ("sd2v", "lora"), ("sdxl", "lcd")])
def test_methods_train_from_a_single_file(tmp_path, shapes_folder, single_files, arch, name):
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    recipe = "debug_sdxl.yaml" if arch == "sdxl" else "debug.yaml"
    cfg = load_config(
        str(ROOT / "configs" / name / recipe),
        [
            f"--model.pretrained={single_files[arch][1]}",
            f"--data.path={shapes_folder}",
            "--train.max_steps=2",
            "--train.validate_every=0",
            "--train.validation_prompts=[]",
            "--train.batch_size=2",
            f"--output_dir={tmp_path / 'run'}",
        ],
    )
    train(cfg)
    export = tmp_path / "run" / "export"
    assert any(export.iterdir())


def test_lcm_lora_from_single_file_loads_in_stock_diffusers_and_merges(tmp_path, shapes_folder, single_files):
    from diffusers import StableDiffusionPipeline

    from ldmkit.commands import generate
    from ldmkit.methods import load_config
    from ldmkit.train.loop import train

    folder, file = single_files["sd15"]
    cfg = load_config(
        str(ROOT / "configs" / "lcm_lora" / "debug.yaml"),
        [
            f"--model.pretrained={file}",
            f"--data.path={shapes_folder}",
            "--train.max_steps=2",
            "--train.validate_every=0",
            "--train.validation_prompts=[]",
            "--train.batch_size=2",
            f"--output_dir={tmp_path / 'run'}",
        ],
    )
    train(cfg)
    lora = tmp_path / "run" / "export"
    # stock diffusers: from_single_file of the same file with local configs, then the LoRA
    pipe = StableDiffusionPipeline.from_single_file(
        str(file), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.get_list_adapters()["unet"]
    # generate --lora from the single file
    out = tmp_path / "gen"
    argv = ["--model", str(file), "--lora", str(lora), "--scheduler", "lcm", "--steps", "2", "--guidance", "1"]
    argv += ["--prompt", "a red circle", "--height", "64", "--width", "64", "--out", str(out)]
    assert cmd(generate, argv) == 0
    assert list(out.glob("*.png"))
    # merge-lora --single-file loads back with the UNet of the merged folder
    base = ["--model", str(file), "--lora", str(lora)]
    assert cmd(merge_lora, [*base, "--out", str(tmp_path / "merged")]) == 0
    assert cmd(merge_lora, [*base, "--single-file", str(tmp_path / "merged.safetensors")]) == 0
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    back = resolve_model(tmp_path / "merged.safetensors")
    assert json.loads((back / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    again = StableDiffusionPipeline.from_pretrained(back)
    sa, sb = merged.unet.state_dict(), again.unet.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-6)
    base_unet = StableDiffusionPipeline.from_pretrained(folder).unet.state_dict()
    assert any(not torch.equal(sa[k], base_unet[k]) for k in sa)  # the LoRA was merged
    with pytest.raises(UserError, match="safetensors"):
        cmd(merge_lora, [*base, "--single-file", str(tmp_path / "m.ckpt")])
