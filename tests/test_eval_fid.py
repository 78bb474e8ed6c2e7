"""FD and KID against direct computations; the feature networks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter

from ldmkit.data import synth
from ldmkit.errors import UserError
from ldmkit.eval.fid import (
    RandomConvFeatures,
    TorchScriptFeatures,
    frechet_distance,
    kernel_inception_distance,
    load_feature_extractor,
    polynomial_mmd2,
)


def fd_direct(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula: scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 written out term by term (Bińkowski et al. 2018, eq. 3) with k = (a.b/d + 1)^3."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("n1,n2,d", [(200, 150, 8), (500, 400, 32), (80, 90, 4)])
def test_fd_matches_scipy_sqrtm(n1, n2, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n1, d))
    b = rng.normal(0.5, 1.0, size=(n2, d)) @ rng.normal(size=(d, d)) * 0.7
    assert frechet_distance(a, b) == pytest.approx(fd_direct(a, b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_known_gaussians():
    """Large samples of N(0, I) and N(mu, 4I): FD -> |mu|^2 + d (1 + 4 - 2*2)."""
    rng = np.random.default_rng(0)
    d = 4
    a = rng.normal(size=(200_000, d))
    b = rng.normal(1.0, 2.0, size=(200_000, d))
    assert frechet_distance(a, b) == pytest.approx(d + d * 1.0, rel=0.02)


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.3, 1.1, size=(50, 6))
    assert polynomial_mmd2(a[:30], b[:30]) == pytest.approx(mmd2_direct(a[:30], b[:30]), rel=1e-6)
    # One subset of all rows of equal-size sets: MMD^2 is permutation invariant.
    mean, std = kernel_inception_distance(a, b[:40], num_subsets=1, subset_size=100)
    assert mean == pytest.approx(mmd2_direct(a, b[:40]), rel=1e-6) and std == 0.0
    # Several subsets: the documented draws (set 1 then set 2 per subset from default_rng(seed)).
    mean, std = kernel_inception_distance(a, b, num_subsets=5, subset_size=20, seed=7)
    g = np.random.default_rng(7)
    vals = []
    for _ in range(5):
        i1, i2 = g.choice(40, 20, replace=False), g.choice(50, 20, replace=False)
        vals.append(mmd2_direct(a[i1], b[i2]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-6) and std == pytest.approx(np.std(vals), rel=1e-6)


def test_kid_separates_distributions():
    rng = np.random.default_rng(2)
    a, a2, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), rng.normal(0.5, 1.0, size=(300, 16))
    same, _ = kernel_inception_distance(a, a2, num_subsets=20, subset_size=100)
    diff, _ = kernel_inception_distance(a, b, num_subsets=20, subset_size=100)
    assert abs(same) < 0.05 < diff


def test_bad_features():
    with pytest.raises(UserError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(UserError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def _shapes(n: int, seed: int) -> list[Image.Image]:
    return [synth.make_sample(i, 32, seed)[0] for i in range(n)]


def test_random_conv_features_are_fixed_and_informative():
    f1, f2 = RandomConvFeatures(), RandomConvFeatures()
    ref = _shapes(120, 0)
    a = f1(ref)
    assert a.shape == (120, 368) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, f2(ref))  # weights depend only on the seed
    assert not np.allclose(a, RandomConvFeatures(seed=1)(ref))
    assert load_feature_extractor(None).name == f1.name == "random-conv-v1-seed0"
    # A fresh sample of the same distribution is closer than blurred, recoloured or re-positioned sets.
    fresh = _shapes(120, 1)
    same = frechet_distance(a, f1(fresh))
    changed = {
        "blur": [im.filter(ImageFilter.GaussianBlur(2.0)) for im in fresh],
        "red": [synth.render({**synth.make_sample(i, 32, 1)[1], "color": "red"}, 32) for i in range(120)],
        "center": [synth.render({**synth.make_sample(i, 32, 1)[1], "position": "center"}, 32) for i in range(120)],
    }
    for name, images in changed.items():
        assert frechet_distance(a, f1(images)) > 1.3 * same, name


class _Net(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = x.float().mean(dim=(2, 3))  # (N, 3)
        return torch.cat([f, f**2], dim=1) if return_features else f


def test_torchscript_features(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(_Net()).save(str(path))
    ext = load_feature_extractor(path)
    assert isinstance(ext, TorchScriptFeatures) and ext.name == "torchscript:net.pt"
    imgs = _shapes(5, 0)
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2)
    expected = _Net()(batch, return_features=True).numpy()
    np.testing.assert_allclose(ext(imgs), expected, rtol=1e-6)  # return_features=True was passed


def test_torch_export_features(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().amax(dim=(2, 3))

    path = tmp_path / "net.pt2"
    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    torch.export.save(torch.export.export(Plain(), (example,)), str(path))
    imgs = _shapes(2, 0)
    expected = np.stack([np.asarray(im).max(axis=(0, 1)) for im in imgs])
    np.testing.assert_allclose(load_feature_extractor(path)(imgs), expected)


def test_feature_net_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_feature_extractor(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a TorchScript"):
        load_feature_extractor(bad)
