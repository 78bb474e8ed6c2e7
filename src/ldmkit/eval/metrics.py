"""The metrics papers report, from maintained libraries, offline: FID with the standard Inception-v3 features and
CLIP score (``ldmkit evaluate --metrics fid,clip_score``).

- FID: torchmetrics' ``FrechetInceptionDistance`` at the 2048-d pool3 features of torch-fidelity's Inception-v3
  port, which loads the TensorFlow 2015-12-05 FID weights converted to PyTorch (the file pytorch-fid, torch-fidelity
  and torchmetrics download: ``weights-inception-2015-12-05-6726825d.pth``), resized like TensorFlow 1.x
  (``antialias=False``: torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``), so the numbers are
  comparable with published FIDs computed by those tools on the same reference set and size.
  The weights come from ``--fid-weights`` or torch hub's cache (``$TORCH_HOME/hub/checkpoints``), never a download.
- CLIP score: torchmetrics' ``CLIPScore``, ``max(100 * mean cos(image, caption), 0)`` (Hessel et al. 2021 with
  torchmetrics' scale), with a transformers CLIP model from a local folder or the Hugging Face cache (offline).

torch-fidelity (and pytorch-fid, clean-fid) declare torchvision, and torch-fidelity's package ``__init__`` imports
it (for its CLIP, DINOv2 and VGG extractors); its Inception module does not. Where torchvision cannot be imported
(a CPU torch whose matching torchvision wheel is not installable), ``_torch_fidelity`` makes the package's modules
importable without running that ``__init__`` instead of re-writing the network here.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.errors import UserError

logger = logging.getLogger(__name__)

METRICS = ("fd", "fid", "clip_score")
"""fd: ldmkit's built-in Fréchet distance (and KID) on weight-free random conv features (ldmkit.eval.fid), the
offline default; fid: FID with the standard Inception-v3 features; clip_score: CLIP score."""

# The file names torch-fidelity (torch_fidelity/feature_extractor_inceptionv3.py URL_INCEPTION_V3) and pytorch-fid
# (src/pytorch_fid/inception.py FID_WEIGHTS_URL) give the converted TF Inception weights in torch hub's cache.
FID_WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FID_FEATURES = 2048
"""The Inception layer of FID: pool3, 2048-d (torchmetrics also offers 64, 192, 768; tests use 64)."""
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
"""The CLIP of SD-distillation papers' CLIP scores (and torchmetrics' CLIPScore default)."""


def parse_metrics(text: str) -> list[str]:
    """ "fid,clip_score" -> ["fid", "clip_score"]; UserError for names not in METRICS."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(f"--metrics: unknown metric(s) {unknown or text!r}; choose from {','.join(METRICS)}")
    return names


def _missing_library(what: str) -> UserError:
    return UserError(f"{what} needs torchmetrics and torch-fidelity: pip install 'ldmkit[metrics]'")


def _torch_fidelity() -> None:
    """Make ``torch_fidelity.<module>`` importable. Its package ``__init__`` imports torchvision; when that fails,
    the package is registered bare (its ``__path__`` only), so the modules torchmetrics' FID imports (the
    Inception-v3 extractor, helpers, TF-compatible resize), which need only torch, load without it."""
    if "torch_fidelity" in sys.modules:
        return
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise _missing_library("--metrics fid")
    try:
        import torch_fidelity  # noqa: F401
    except (ImportError, RuntimeError) as e:  # torchvision missing, or built for another torch
        logger.debug("torch_fidelity's __init__ failed (%s); loading its modules without it", e)
        for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
            del sys.modules[name]
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["torch_fidelity"] = package


def _torchmetrics(what: str):
    """``torchmetrics``, imported after ``_torch_fidelity`` (torchmetrics imports torch_fidelity when installed)."""
    if importlib.util.find_spec("torch_fidelity") is not None:
        _torch_fidelity()
    try:
        import torchmetrics
    except ImportError as e:
        raise _missing_library(what) from e
    return torchmetrics


def find_fid_weights(path: str | Path | None) -> Path:
    """The Inception FID weights: ``path``, else torch hub's cache; a UserError saying how to get them."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--fid-weights {p} not found (the Inception-v3 FID weights, {FID_WEIGHTS_FILES[0]})")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in FID_WEIGHTS_FILES:
        if (cache / name).is_file():
            return cache / name
    raise UserError(
        f"--metrics fid needs the Inception-v3 FID weights ({FID_WEIGHTS_FILES[0]}), not found in {cache}: "
        f"download {FID_WEIGHTS_URL} once and pass --fid-weights PATH (or put it in that folder)"
    )


def _uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8, one size."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


class InceptionFID:
    """FID of image sets against one reference set: torchmetrics' FrechetInceptionDistance (2048-d pool3 of the
    TF-ported Inception-v3, TF 1.x resize), the reference's statistics computed once per image size."""

    def __init__(self, weights: str | Path | None, device: torch.device | str | None = None, batch_size: int = 50):
        path = find_fid_weights(weights)
        try:  # checked as plain tensors first: torch-fidelity unpickles the file without weights_only
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--fid-weights {path} is not a PyTorch state dict ({str(e).splitlines()[0]})") from e
        _torch_fidelity()  # a UserError when it is not installed (torchmetrics' FID needs its network)
        _torchmetrics("--metrics fid")
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            self.metric = FrechetInceptionDistance(
                feature=FID_FEATURES,
                feature_extractor_weights_path=str(path),
                antialias=False,
                reset_real_features=False,
            )
        except RuntimeError as e:  # load_state_dict: other keys or shapes
            raise UserError(
                f"--fid-weights {path} are not the Inception-v3 FID weights ({FID_WEIGHTS_FILES[0]}): "
                f"{str(e).splitlines()[0]}"
            ) from e
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.metric.to(self.device)
        self.batch_size = batch_size
        layer = "pool3" if FID_FEATURES == 2048 else f"{FID_FEATURES}-d features"
        self.name = f"inception-v3-2015-12-05 {layer} ({path.name}, torchmetrics)"
        self._reference_size: tuple[int, int] | None = None

    def _update(self, images: Sequence[Image.Image], real: bool) -> None:
        for i in range(0, len(images), self.batch_size):
            self.metric.update(_uint8(images[i : i + self.batch_size]).to(self.device), real=real)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], reference: Sequence[Image.Image], match_size=None) -> float:
        """FID of ``images`` to ``reference``, which ``match_size(reference, size)`` brings to the images' size
        (as ldmkit's FD; the network then resizes both to 299 px); the reference's statistics are kept per size."""
        size = images[0].size
        if self._reference_size != size:
            self.metric.reset_real_features = True
            self.metric.reset()
            self.metric.reset_real_features = False
            self._update(match_size(reference, size) if match_size else reference, real=True)
            self._reference_size = size
        self.metric.reset()  # the generated set's statistics only (reset_real_features=False)
        self._update(images, real=False)
        return float(self.metric.compute())


def resolve_clip_model(name_or_path: str) -> Path:
    """A local CLIP folder: ``name_or_path`` itself, or a Hugging Face id's snapshot in the local cache (offline)."""
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"--clip-model {p} is not a transformers CLIP folder (no config.json)")
        return p
    if p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise UserError(f"--clip-model {name_or_path} not found (a transformers CLIP folder or a Hugging Face id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise UserError(
            f"--clip-model {name_or_path} is not in the Hugging Face cache: download it once with "
            f"`huggingface-cli download {name_or_path}` (or pass a local folder)"
        ) from None


class _Embeddings(torch.nn.Module):
    """A transformers CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings: transformers >= 5 returns them as a model output's ``pooler_output``, torchmetrics (1.9) expects
    the tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class LibraryClipScore:
    """CLIP score of (image, prompt) pairs: torchmetrics' CLIPScore over all pairs, ``max(100 * mean cos, 0)``."""

    def __init__(self, name_or_path: str | Path, device: torch.device | str | None = None):
        folder = resolve_clip_model(str(name_or_path))
        _torchmetrics("--metrics clip_score")
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        def load():  # torchmetrics takes a loader for models outside its list of hub names
            model = _Embeddings(CLIPModel.from_pretrained(folder, local_files_only=True).eval())
            return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)

        try:
            self.metric = CLIPScore(model_name_or_path=load)
        except (OSError, ValueError) as e:
            raise UserError(f"--clip-model {name_or_path}: not a CLIP model ({str(e).splitlines()[0]})") from e
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.metric.to(self.device)
        self.name = str(name_or_path)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 32) -> float:
        self.metric.reset()
        for i in range(0, len(images), batch_size):
            batch = _uint8(images[i : i + batch_size]).to(self.device)
            self.metric.update(list(batch), list(prompts[i : i + batch_size]))
        return float(self.metric.compute())
