"""Every export knows how it is sampled: the sampling record the methods write next to their exports, the one
library call that reads it (``inference.load_export``), and the commands that go through it (generate,
evaluate, merge-lora, convert-model); the one LoRA config (alpha, targets, seeded init) and the settings
derived from the model family at config time; and that no method name is compared outside its own module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

from ldmkit.cli import main
from ldmkit.errors import UserError
from ldmkit.inference import SAMPLING_RECORD, load_export, read_sampling_record
from ldmkit.methods import BUILTIN_METHODS, load_config

from helpers.lcm import make_distill_method
from helpers.sd import pinned_threads  # noqa: F401  (autouse fixture)

SRC = Path(__file__).parents[1] / "src" / "ldmkit"


def export_run(name: str, model_dir: Path, out: Path, *extra: str) -> Path:
    """A distillation method's export as the loop writes it (weights, scheduler, sampling record), untrained."""
    method = make_distill_method(name, model_dir, out, "--method.num_ddim_timesteps=25", *extra)
    export = out / "export"
    export.mkdir(parents=True)
    method.export(export)
    method.sampling_record().save(export)
    return export


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_sd15):
    """name -> export folder of tcd_lora (gamma 0.2: not the library default), pcm_lora, lcm_lora and tcd."""
    made = {}
    for name, extra in (
        ("tcd_lora", ["--method.gamma=0.2"]),
        ("pcm_lora", []),
        ("lcm_lora", []),
        ("tcd", ["--method.gamma=0.4"]),
    ):
        made[name] = export_run(name, tiny_sd15, tmp_path_factory.mktemp(name), *extra)
    return made


def generate_settings(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "gen"
    assert main(["generate", *argv, "--prompt", "x", "--height", "32", "--width", "32", "--out", str(out)]) == 0
    return json.loads((out / "generate.json").read_text())


@pytest.mark.parametrize("name,scheduler,eta", [("tcd_lora", "TCDScheduler", 0.2), ("pcm_lora", "TCDScheduler", 0.0)])
def test_generate_samples_a_lora_export_as_its_record_says(exports, tiny_sd15, tmp_path, name, scheduler, eta):
    """No --scheduler, --eta, --steps or --guidance: the export's record decides (it used to be LCM, eta 0)."""
    record = read_sampling_record(exports[name])
    assert record.kind == "lora" and record.scheduler == scheduler and record.eta == eta
    assert record.base == str(tiny_sd15.resolve())
    settings = generate_settings(tmp_path, "--model", str(tiny_sd15), "--lora", str(exports[name]))
    assert settings["scheduler_class"] == scheduler and settings["eta"] == eta
    assert settings["steps"] == 4 and settings["guidance"] == 1.0
    # the flags still win
    settings = generate_settings(
        tmp_path, "--model", str(tiny_sd15), "--lora", str(exports[name]), "--steps", "2", "--eta", "0.5"
    )
    assert settings["steps"] == 2 and settings["eta"] == 0.5


def test_a_lora_export_alone_loads_onto_the_base_its_record_names(exports, tmp_path):
    settings = generate_settings(tmp_path, "--model", str(exports["tcd_lora"]))
    assert settings["scheduler_class"] == "TCDScheduler" and settings["eta"] == 0.2


def test_load_export_gives_the_exported_scheduler_and_its_grid(exports, tiny_sd15):
    pipe, sampling = load_export(exports["lcm_lora"], base=tiny_sd15)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 25
    assert (sampling.steps, sampling.guidance, sampling.eta) == (4, 1.0, None)
    # another sampler keeps the export's grid; the record's eta belongs to its own sampler
    pipe, sampling = load_export(exports["tcd_lora"], base=tiny_sd15, scheduler="lcm")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 25
    assert sampling.eta is None
    with pytest.raises(UserError, match="whole TCD pipeline, not a LoRA"):
        load_export(exports["tcd"], base=tiny_sd15)


def test_full_export_record_embeds_guidance(exports):
    record = read_sampling_record(exports["tcd"])
    assert record.kind == "pipeline" and record.guidance_embedded and record.eta == 0.4 and record.base is None
    pipe, sampling = load_export(exports["tcd"])
    assert isinstance(pipe.scheduler, TCDScheduler) and sampling.eta == 0.4


def test_an_export_without_a_record_samples_as_before(exports, tiny_sd15, tmp_path):
    """Older exports (no ldmkit_sampling.json): the saved scheduler, the sampler's defaults."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(exports["lcm_lora"], old)
    (old / SAMPLING_RECORD).unlink()
    assert read_sampling_record(old) is None
    pipe, sampling = load_export(old, base=tiny_sd15)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 25
    assert (sampling.steps, sampling.guidance, sampling.record) == (4, 1.0, None)


def test_the_record_round_trips_through_merge_lora_and_convert_model(exports, tiny_sd15, tmp_path):
    lora = str(exports["tcd_lora"])
    merged = tmp_path / "merged"
    assert main(["merge-lora", "--model", str(tiny_sd15), "--lora", lora, "--out", str(merged)]) == 0
    record = read_sampling_record(merged)
    assert (record.kind, record.scheduler, record.eta, record.base) == ("pipeline", "TCDScheduler", 0.2, None)
    pipe, sampling = load_export(merged)
    assert isinstance(pipe.scheduler, TCDScheduler) and sampling.eta == 0.2
    # merged into one file: the record rides in its metadata, and back into a folder
    single = tmp_path / "merged.safetensors"
    assert main(["merge-lora", "--model", str(tiny_sd15), "--lora", lora, "--single-file", str(single)]) == 0
    assert read_sampling_record(single) == record
    back = tmp_path / "back"
    assert main(["convert-model", "--in", str(single), "--to", "diffusers", "--out", str(back)]) == 0
    assert read_sampling_record(back) == record
    again = tmp_path / "again.safetensors"
    assert main(["convert-model", "--in", str(merged), "--to", "single-file", "--out", str(again)]) == 0
    assert read_sampling_record(again) == record
    settings = generate_settings(tmp_path, "--model", str(back))
    assert settings["scheduler_class"] == "TCDScheduler" and settings["eta"] == 0.2 and settings["steps"] == 4


# ------------------------------------------------------------------------ one LoRA config, derived settings
def test_dry_run_shows_the_family_defaults_in_effect(tiny_sd15, tiny_sdxl):
    overrides = [f"--model.pretrained={tiny_sdxl}", "--method.lora_rank=8", "--method.lora_alpha=null"]
    cfg = load_config("lcm_lora/debug_sdxl", overrides)
    assert cfg.method.w_min == 3.0  # SDXL's, as the references
    assert cfg.method.lora_alpha == 8.0  # null = the rank, one rule for every LoRA method
    assert "time_emb_proj" in cfg.method.lora_target_modules  # distillation: the 14 module kinds
    cfg = load_config("lora/debug", [f"--model.pretrained={tiny_sd15}", "--method.lora_target_modules=null"])
    assert cfg.method.lora_target_modules == ["to_k", "to_q", "to_v", "to_out.0"]  # fine-tuning: attention
    assert cfg.method.lora_alpha == 4.0


def test_w_max_is_checked_against_the_w_min_in_effect(tiny_sd15):
    with pytest.raises(UserError, match=r"method.w_min \(5.0\) must be <= method.w_max \(4.0\)"):
        load_config("lcm_lora/debug", [f"--model.pretrained={tiny_sd15}", "--method.w_max=4"])


@pytest.mark.parametrize("alpha", ["0", "-1"])
def test_lora_alpha_must_be_positive_for_every_lora_method(tiny_sd15, alpha):
    for recipe in ("lora/debug", "lcm_lora/debug"):
        with pytest.raises(UserError, match="method.lora_alpha must be positive"):
            load_config(recipe, [f"--model.pretrained={tiny_sd15}", f"--method.lora_alpha={alpha}"])


def test_lcm_lora_init_comes_from_train_seed(tiny_sd15, tmp_path):
    """The adapter's random init is seeded from train.seed, whatever the global RNG drew before."""

    def lora_a(seed: int, draws: int):
        torch.manual_seed(123)
        torch.rand(draws)
        m = make_distill_method("lcm_lora", tiny_sd15, tmp_path / f"{seed}-{draws}", f"--train.seed={seed}")
        return {n: p.detach().clone() for n, p in m.unet.named_parameters() if "lora_A" in n}

    a, b, c = lora_a(0, 0), lora_a(0, 1000), lora_a(1, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------ a method is one module
def _method_names() -> set[str]:
    return set(BUILTIN_METHODS)


AMBIGUOUS = {"lora", "vae"}
"""Method names that are also words for other things (an adapter kind, a pipeline component): a comparison
with them counts only when the other side is about a method (its text says "method")."""


def _is_method_name(node: ast.AST, other: ast.AST | None = None) -> bool:
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _method_names()):
        return False
    return node.value not in AMBIGUOUS or (other is not None and "method" in ast.unparse(other))


def _own_modules() -> set[Path]:
    """Where a method's name may be compared: its own module, its config module and the registry."""
    own = {SRC / "methods" / "__init__.py", SRC / "methods" / "configs.py"}
    for spec in BUILTIN_METHODS.values():
        own.add(SRC / (spec.split(":")[0].removeprefix("ldmkit.").replace(".", "/") + ".py"))
    return own


def method_name_comparisons(tree: ast.AST) -> list[int]:
    """Lines that compare with a method name (==, !=, in a tuple or set, startswith/endswith) or key a table
    by method names (a dict with two or more of them as keys)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for side in sides:
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                others = [s for s in sides if s is not side]
                if any(_is_method_name(i, o) for i in items for o in others):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith") and node.args:
                arg = node.args[0]
                prefixes = {n.split("_")[0] for n in _method_names()}
                if isinstance(arg, ast.Constant) and arg.value in prefixes | _method_names():
                    lines.append(node.lineno)
        elif isinstance(node, ast.Dict):
            if sum(_is_method_name(k, k) for k in node.keys if k is not None) >= 2:
                lines.append(node.lineno)
    return lines


def test_no_method_name_is_compared_outside_its_module():
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        if path in _own_modules():
            continue
        lines = method_name_comparisons(ast.parse(path.read_text()))
        if lines:
            found[str(path.relative_to(SRC))] = lines
    assert not found, f"method names compared outside their modules: {found}"


def test_the_name_check_finds_what_it_looks_for():
    """Negative control: the check sees each form it forbids."""
    for code in (
        'x == "lcm_lora"',
        'name.startswith("tcd")',
        'm in ("pcm", "lcd")',
        'T = {"lcm_lora": 1, "tcd": 2}',
    ):
        assert method_name_comparisons(ast.parse(code)), code
    assert method_name_comparisons(ast.parse('cfg.method.name == "lora"'))
    assert not method_name_comparisons(ast.parse('method = "lcm_lora"'))
    assert not method_name_comparisons(ast.parse('adapter != "lora"'))  # an adapter kind, not a method


def test_card_of_a_run_on_a_single_file_base_loads_it_with_from_single_file(tiny_sd15, tmp_path, monkeypatch):
    """A LoRA trained on a single-file checkpoint: the card's snippet is ``from_single_file`` with a config
    folder (from_pretrained of a .safetensors fails), and the record names the file as the base."""
    from ldmkit.families.single_file import save_single_file
    from ldmkit.inference import load_pipeline
    from ldmkit.methods.card import write_model_card

    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    single = save_single_file(load_pipeline(tiny_sd15), tmp_path / "base.safetensors")
    method = make_distill_method("lcm_lora", single, tmp_path / "run")
    export = tmp_path / "export"
    export.mkdir()
    method.export(export)
    card = write_model_card(method, method.cfg, export, tmp_path / "samples").read_text()
    assert f'StableDiffusionPipeline.from_single_file("{single.resolve()}", config="' in card
    assert 'from_pretrained("' + str(single) not in card
    assert method.sampling_record().base == str(single.resolve())
