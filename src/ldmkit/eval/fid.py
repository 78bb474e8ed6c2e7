"""Fréchet distance and Kernel Inception Distance between two feature sets, and the feature networks.

FD (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule..."): the Fréchet distance of two
Gaussians fitted to the features, ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
KID (Bińkowski et al. 2018, "Demystifying MMD GANs", Sec. 4): the unbiased estimate of MMD^2 with the
cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (mean and std).

Feature networks (``FeatureExtractor``):
- ``TorchScriptFeatures``: any TorchScript file the user has locally, e.g. the Inception-v3 of
  StyleGAN2-ADA / clean-fid (``inception-2015-12-05.pt``, TF-FID weights). Only such a network gives
  numbers comparable with published FID; nothing is ever downloaded.
- ``RandomConvFeatures`` (default): a fixed random conv net whose weights come from NumPy's frozen
  legacy ``RandomState`` stream, so it needs no weights file and gives the same features in every
  install. Its FD/KID are only comparable with other ldmkit numbers from the same network name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.errors import UserError

logger = logging.getLogger(__name__)


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FD between Gaussians fitted to two (N, D) feature sets (covariance with N - 1, as pytorch-fid).

    tr((S1 S2)^(1/2)) is computed as the trace of the symmetric PSD root of S1^(1/2) S2 S1^(1/2)
    (same eigenvalues as S1 S2), with eigh, which stays real and stable where scipy's sqrtm of the
    non-symmetric product needs an epsilon retry.
    """
    f1, f2 = _check_pair(feats1, feats2, min_rows=2)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples under k(a, b) = (a.b / d + 1)^3 (Bińkowski et al. eq. 3)."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off = m * (m - 1)
    return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.mean())


def kernel_inception_distance(
    feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID as (mean, std) of ``polynomial_mmd2`` over ``num_subsets`` random subsets of each set.

    Subsets have ``min(subset_size, N1, N2)`` rows drawn without replacement (as torch-fidelity);
    subset i uses ``np.random.default_rng(seed)`` draws for set 1 then set 2, in that order.
    """
    f1, f2 = _check_pair(feats1, feats2, min_rows=2)
    m = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        i1 = rng.choice(len(f1), m, replace=False)
        i2 = rng.choice(len(f2), m, replace=False)
        vals.append(polynomial_mmd2(f1[i1], f2[i2]))
    return float(np.mean(vals)), float(np.std(vals))


def _check_pair(feats1: np.ndarray, feats2: np.ndarray, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise UserError(f"feature sets must be (N, D) with the same D, got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < min_rows:
        raise UserError(f"FD/KID need at least {min_rows} images per set, got {len(f1)} and {len(f2)}")
    return f1, f2


class FeatureExtractor(Protocol):
    """Maps images to an (N, D) feature array; ``name`` identifies the network in metrics files."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def _uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8 tensor; all images must share one size."""
    arrs = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrs}) != 1:
        raise UserError("feature extraction needs images of one size; resize them first")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


class RandomConvFeatures:
    """A fixed random conv net: 64x64 input, three 4x4 stride-2 convs + ReLU -> 368 features.

    Features: every layer's per-channel mean and standard deviation (texture statistics of random
    filters, which see colour, edges and sharpness), plus the first layer's activations averaged on
    a 3x3 grid and scaled by 0.3 (coarse layout; the weight keeps it from drowning the rest). On
    shapes data this separates blurred, recoloured, re-shaped and re-positioned sets from a fresh
    sample of the same distribution (tests/test_eval_fid.py).

    Weights are He-scaled normals from ``np.random.RandomState(seed)`` (NumPy keeps that stream
    frozen across versions), so the network is identical in every install and needs no file. The
    numbers are NOT comparable with Inception-based FID, only with ldmkit numbers of the same ``name``.
    """

    CHANNELS = (3, 16, 32, 64)
    INPUT = 64
    LAYOUT_GRID, LAYOUT_WEIGHT = 3, 0.3

    def __init__(self, seed: int = 0, device: torch.device | str | None = None, batch_size: int = 64):
        self.name = f"random-conv-v1-seed{seed}"
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = batch_size
        rs = np.random.RandomState(seed)
        self.weights = []
        for cin, cout in zip(self.CHANNELS[:-1], self.CHANNELS[1:]):
            w = rs.standard_normal((cout, cin, 4, 4)) * np.sqrt(2.0 / (cin * 16))
            self.weights.append(torch.tensor(w, dtype=torch.float32, device=self.device))

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = (
                _uint8_batch(images[i : i + self.batch_size]).to(self.device, torch.float32) / 127.5 - 1.0
            )  # (B, 3, H, W)
            x = F.interpolate(x, size=(self.INPUT, self.INPUT), mode="bilinear", align_corners=False, antialias=True)
            feats = []
            for k, w in enumerate(self.weights):
                x = F.relu(F.conv2d(x, w, stride=2, padding=1))  # (B, C, H/2, W/2)
                feats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]  # (B, C) each
                if k == 0:
                    feats.append(
                        self.LAYOUT_WEIGHT * F.adaptive_avg_pool2d(x, self.LAYOUT_GRID).flatten(1)
                    )  # (B, C * 9)
            out.append(torch.cat(feats, dim=1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


class TorchScriptFeatures:
    """A user-supplied TorchScript (or ``torch.export`` ``.pt2``) feature network, from a local file only.

    Contract: the module takes a uint8 (N, 3, H, W) batch at the images' own size (it resizes and
    normalises itself) and returns (N, D) features. If its ``forward`` has a ``return_features``
    argument it is passed True: that is how StyleGAN2-ADA's ``inception-2015-12-05.pt`` returns its
    2048-d pool features, the features of standard FID.
    """

    def __init__(self, path: str | Path, device: torch.device | str | None = None, batch_size: int = 64):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"feature network file not found: {path}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:
            if path.suffix == ".pt2":  # torch.export archive, the successor of TorchScript
                self.module = torch.export.load(str(path)).module().to(self.device)
                args = list(inspect.signature(self.module.forward).parameters)
            else:
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
                args = [a.name for a in self.module.forward.schema.arguments]
        except RuntimeError as e:
            raise UserError(f"{path} is not a TorchScript / torch.export file ({str(e).splitlines()[0]})") from e
        self.kwargs = {"return_features": True} if "return_features" in args else {}
        self.name = f"torchscript:{path.name}"
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = _uint8_batch(images[i : i + self.batch_size]).to(self.device)
            out.append(self.module(x, **self.kwargs).float().flatten(1).cpu().numpy())  # (B, D)
        return np.concatenate(out).astype(np.float64)


def load_feature_extractor(
    path: str | Path | None = None, device: torch.device | str | None = None
) -> FeatureExtractor:
    """The TorchScript network at ``path``, or the weight-free ``RandomConvFeatures`` when no path is given."""
    if path is None:
        logger.info("FD/KID use the built-in random conv features (comparable only within ldmkit)")
        return RandomConvFeatures(device=device)
    return TorchScriptFeatures(path, device=device)
