"""How far generated image sets are from a reference set of the same prompts and seeds (the
quickstart compares the LCM and the few-step teacher with the teacher's 50-step images)."""

from __future__ import annotations

from pathlib import Path


def distances_to(ref_dir: Path, sets: dict[str, Path], n: int) -> dict[str, dict[str, float]]:
    """How far each saved image set (``sets``: name -> folder of ``00000.png`` ..., the first ``n`` used)
    is from the one in ``ref_dir`` (the quickstart: the teacher's 50-step set; same prompts and seeds):

    - ``rms``: root-mean-square pixel difference (0-1 scale) image by image, i.e. from the same initial
      noise: the LCM learns to jump along the teacher's guided probability-flow ODE, so this is what
      distillation optimises; but a multistep LCM re-noises between steps (LCMScheduler draws fresh
      noise) and so leaves the teacher's path while still sampling the same distribution;
    - ``fd``: Fréchet distance of the whole set (ldmkit's built-in features), which does not penalise
      that. KID was too noisy at ~100 images to rank the settings.
    """
    import numpy as np
    from PIL import Image

    from ldmkit.eval.fid import frechet_distance, load_feature_extractor

    features = load_feature_extractor(None)

    def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        images = [Image.open(folder / f"{i:05d}.png").convert("RGB") for i in range(n)]
        return np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images]), features(images)

    ref_pixels, ref_feats = load(ref_dir)
    out = {}
    for name, folder in sets.items():
        pixels, feats = load(folder)
        out[name] = {
            "rms": float(np.sqrt(((pixels - ref_pixels) ** 2).mean())),
            "fd": frechet_distance(feats, ref_feats),
        }
    return out
