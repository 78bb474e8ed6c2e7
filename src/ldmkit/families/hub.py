"""Model references as users have them: a diffusers folder, a single-file checkpoint, or a Hugging Face
repo id (``owner/name[@revision]``) resolved from the local Hugging Face cache (``HF_HUB_CACHE`` /
``HF_HOME``), all offline. Every reference resolves to a local diffusers folder; a single file is
converted once into ``$LDMKIT_CACHE/single-file/`` (default ``~/.cache/ldmkit``), keyed by its content.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from ldmkit.errors import UserError
from ldmkit.families.single_file import SUFFIXES, cached_folder, load_single_file, read_keys
from ldmkit.families.transformer_file import KINDS, build_folder, released_repo, transformer_kind

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def split_repo_id(ref: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when ``ref`` has the form of a Hub repo id (``owner/name[@revision]``), else None."""
    if ref.startswith((".", "/", "~")) or not _REPO_ID.match(ref):
        return None
    repo, _, revision = ref.partition("@")
    return repo, revision or None


def cache_root() -> Path:
    return Path(os.environ.get("LDMKIT_CACHE") or Path.home() / ".cache" / "ldmkit")


def _file_key(path: Path, tokenizer: str | None, prediction_type: str | None, components: Path | None = None) -> str:
    from ldmkit.families.base import _file_identity

    h = hashlib.sha256(_file_identity(path))
    h.update(f"{tokenizer and Path(tokenizer).resolve()}|{prediction_type}".encode())
    if components is not None:  # a transformer file's folder depends on where its other parts come from
        h.update(f"|{components.resolve()}".encode())
    return h.hexdigest()[:16]


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (complete folders only: an interrupted conversion is redone);
    when another process got there first, keep its folder."""
    try:
        tmp.rename(out)
    except OSError:
        if not any(out.glob("*.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_vae(ref: str, pretrained: Path, *, allow_pickle: bool = False) -> Path:
    """model.vae as a folder: a VAE or pipeline folder, a cached repo id, or a single-file VAE (original
    ``encoder.*/decoder.*`` keys, or a whole checkpoint's ``first_stage_model.*``) loaded with diffusers'
    ``AutoencoderKL.from_single_file`` on the VAE config of model.pretrained (same architecture)."""
    path = Path(ref).expanduser()
    if path.suffix not in SUFFIXES:
        return resolve_model(ref, what="model.vae")
    if not path.is_file():
        raise UserError(f"model.vae checkpoint file not found: {path}")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise UserError(
            f"model.vae {path.name} is a pickle: convert it to .safetensors or set model.allow_pickle: true"
        )
    from diffusers import AutoencoderKL

    out = cache_root() / "single-file" / f"{path.stem}-vae-{_file_key(path, str(pretrained), None)}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        vae = AutoencoderKL.from_single_file(str(path), config=str(pretrained), subfolder="vae", local_files_only=True)
        vae.save_pretrained(tmp)
        _publish(tmp, out)
    return out


def resolve_model(
    ref: str | Path,
    *,
    what: str = "model.pretrained",
    allow_pickle: bool = False,
    tokenizer: str | None = None,
    prediction_type: str | None = None,
    components_from: str | None = None,
) -> Path:
    """The local diffusers folder ``ref`` stands for (a folder, a single file, or a cached repo id); a single
    original-layout FLUX / SD3 transformer file takes its other parts from ``components_from``."""
    text = str(ref)
    if not text:
        raise UserError(f"{what} is empty: set it to a diffusers folder, a .safetensors checkpoint or a repo id")
    path = Path(text).expanduser()
    if path.is_dir():
        _check_diffusers_folder(path, text, what, deep=False)
        return path
    if path.suffix in SUFFIXES:
        if not path.is_file():
            raise UserError(f"{what} checkpoint file not found: {path}")
        keys = read_keys(path)[0] if path.suffix == ".safetensors" else {}  # the header only
        if transformer_kind(keys) is not None:
            return _transformer_file(path, keys, what, components_from)
        out = cache_root() / "single-file" / f"{path.stem}-{_file_key(path, tokenizer, prediction_type)}"
        if not (out / "model_index.json").is_file():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            load_single_file(path, tmp, allow_pickle=allow_pickle, tokenizer=tokenizer, prediction_type=prediction_type)
            _publish(tmp, out)
            log.info("converted %s into the diffusers folder %s", path, out)
        return out
    if path.exists():
        raise UserError(
            f"{what} {text} is a file but not a checkpoint ({', '.join(SUFFIXES)}): give a diffusers folder, a "
            ".safetensors file or a repo id"
        )
    repo = split_repo_id(text)
    if repo is None:
        raise UserError(
            f"{what} not found: {_no_such_path(path)} (give a diffusers folder, a .safetensors file or a repo id)"
        )
    folder = cached_folder(*repo)
    if folder is None:
        from huggingface_hub import constants

        # The folder comes first: "models/sd15" or "my/model" mistyped is far more often a path than a repo id.
        raise UserError(
            f"{what} {text} not found: {_no_such_path(path)}, and no repo {repo[0]} in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or constants.HF_HUB_CACHE}); check the path, or download the repo "
            f"first (hf download {repo[0]})"
        )
    _check_diffusers_folder(folder, text, what, deep=True)
    return folder


def _transformer_file(path: Path, keys: dict, what: str, components_from: str | None) -> Path:
    """The diffusers folder of a single original-layout FLUX / SD3 transformer file (transformer_file.py): its
    other parts from ``components_from`` (a diffusers folder or cached repo id), else from the released model's
    repo in the Hugging Face cache; converted once into the ldmkit cache, keyed by the file and the components."""
    kind = transformer_kind(keys)
    if components_from:
        components = resolve_model(components_from, what="model.components_from")
    else:
        repo = released_repo(kind, keys)
        components = cached_folder(repo)
        if components is None:
            raise UserError(
                f"{what} {path.name} is a single {KINDS[kind][0]} transformer file: its text encoders, VAE and "
                f"scheduler come from a diffusers folder; set model.components_from (--components-from) to one, or "
                f"put {repo} in the Hugging Face cache"
            )
    out = cache_root() / "single-file" / f"{path.stem}-{_file_key(path, None, None, components)}"
    if not (out / "model_index.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        dtype = next(d for k, d in keys.items() if transformer_kind([k]) is not None)
        build_folder(path, kind, dtype, components, tmp)
        _publish(tmp, out)
        log.info("converted %s into the diffusers folder %s", path, out)
    return out


def _no_such_path(path: Path) -> str:
    """``no folder or file /abs/path``, with the nearest name in its parent folder when one is close (a typo)."""
    import difflib

    full = path.absolute()
    parent = full.parent
    names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    close = difflib.get_close_matches(full.name, names, n=1, cutoff=0.75)
    hint = f"; did you mean {path.parent / close[0]}?" if close else ""
    return f"no folder or file {full}{hint}"


def _check_diffusers_folder(folder: Path, ref: str, what: str, *, deep: bool) -> None:
    """A folder (or cached repo: ``deep``, its subfolders too) that holds single-file checkpoints but no
    diffusers layout (model_index.json for a pipeline, config.json for one model) stops with the files to
    pass instead, rather than with a missing model_index.json further on."""
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return
    # Files next to a config.json are a diffusers component's weights (unet/, vae/), not single files.
    files = sorted(
        f
        for f in (folder.rglob("*") if deep else folder.iterdir())
        if f.suffix in SUFFIXES and f.is_file() and not (f.parent / "config.json").is_file()
    )
    if not files:
        return
    shown = ", ".join(str(f) for f in files[:4]) + (f" (and {len(files) - 4} more)" if len(files) > 4 else "")
    kind = "the cached repo" if deep else "the folder"
    raise UserError(
        f"{what} {ref}: {kind} is not a diffusers folder (no model_index.json) but holds single-file checkpoints; "
        f"pass one of them instead: {shown}"
    )
