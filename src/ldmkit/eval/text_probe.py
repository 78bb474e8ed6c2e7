"""Does a text encoder tell the training captions apart? Nearest-neighbour distances between caption
embeddings and a linear probe per attribute, on the encoder's last hidden state flattened over the token
positions (what the U-ViT attends to, models/uvit.py ``context_embed``).

The quickstart measures its frozen random encoder (``ldmkit.models.text``) with this instead of assuming
that random embeddings separate the captions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ldmkit.errors import UserError

log = logging.getLogger(__name__)

PROBE_RIDGE = 1e-3
"""Ridge penalty of the attribute probe, relative to the mean squared norm of the centred embeddings."""


@torch.no_grad()
def embed_captions(text_encoder: Any, tokenizer: Any, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Last hidden state [N, L, D] in fp32, tokenised exactly as the model families / UViTPipeline do (padded to
    ``model_max_length``)."""
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(
            captions[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(text_encoder(ids.to(device))[0].float().cpu())  # (b, L, D)
    return torch.cat(out)


def _probe_accuracy(x: np.ndarray, labels: list[str], ridge: float) -> float:
    """Leave-one-out accuracy of a one-vs-rest ridge regression (unpenalised intercept) on ``x`` [n, d].

    Exact LOO from one fit: residual_i / (1 - h_ii) with the hat matrix H = 11^T/n + K (K + lam I)^-1,
    K the Gram matrix of the centred rows (Hastie et al., Elements of Statistical Learning, eq. 7.52).
    """
    classes = sorted(set(labels))
    y = np.eye(len(classes))[[classes.index(v) for v in labels]]  # (n, C)
    xc = x - x.mean(axis=0)
    gram = xc @ xc.T  # (n, n)
    n = len(labels)
    lam = ridge * np.trace(gram) / n
    hat = np.full((n, n), 1.0 / n) + gram @ np.linalg.inv(gram + lam * np.eye(n))
    h = np.diag(hat)[:, None]
    loo = (hat @ y - h * y) / (1.0 - h)  # (n, C) prediction for each row without that row
    return float(np.mean(loo.argmax(axis=1) == y.argmax(axis=1)))


def caption_separation(
    text_encoder: Any,
    tokenizer: Any,
    captions: list[str],
    attributes: Mapping[str, Mapping[str, str] | None] | None = None,
    ridge: float = PROBE_RIDGE,
    max_captions: int = 2048,
) -> dict[str, float]:
    """How well the frozen encoder tells ``captions`` apart, from its last hidden state flattened over
    the token positions (what the U-ViT attends to).

    - ``min_to_median_distance``: smallest Euclidean distance between two distinct captions divided by
      the median one (0: two captions look identical to the model).
    - ``empty_to_median_distance``: distance of the empty prompt (the classifier-free guidance
      unconditional input) to its nearest caption, over the same median.
    - ``truncated_fraction``: share of distinct captions longer than the tokenizer's max length.
    - ``num_captions``: distinct captions measured; above ``max_captions``, a fixed random subset of
      that many (the distances are quadratic in it).
    - ``probe_<attribute>``: with ``attributes`` (caption -> {attribute: value}, e.g.
      ``ldmkit.data.synth.parse_caption``; captions mapped to None or missing are left out), the
      leave-one-out accuracy of a linear (ridge) probe predicting each attribute from the embedding.
    """
    distinct = [c for c in dict.fromkeys(captions) if c]  # "" is measured separately, as the empty prompt
    if len(distinct) < 2:
        raise UserError(f"caption separation needs at least 2 distinct captions, got {len(distinct)}")
    if len(distinct) > max_captions:
        distinct = random.Random(0).sample(distinct, max_captions)
    emb = embed_captions(text_encoder, tokenizer, distinct + [""]).flatten(1).double()  # (N+1, L*D)
    x, empty = emb[:-1], emb[-1:]
    dist = torch.cdist(x, x)
    upper = dist[torch.triu_indices(len(x), len(x), offset=1).unbind()]
    median = upper.median()
    i, j = divmod(int((dist + torch.diag(torch.full((len(x),), float("inf"), dtype=dist.dtype))).argmin()), len(x))
    log.info("closest captions: %r / %r (distance %.3g, median %.3g)", distinct[i], distinct[j], dist[i, j], median)
    # Tokenised one past the limit: longer means truncated (and no over-length warning).
    lengths = [
        len(ids) for ids in tokenizer(distinct, truncation=True, max_length=tokenizer.model_max_length + 1).input_ids
    ]
    result = {
        "num_captions": float(len(distinct)),
        "min_to_median_distance": float(upper.min() / median),
        "empty_to_median_distance": float(torch.cdist(empty, x).min() / median),
        "truncated_fraction": float(np.mean([n > tokenizer.model_max_length for n in lengths])),
    }
    if attributes:
        rows = {c: k for k, c in enumerate(distinct)}
        labelled = [(c, a) for c, a in attributes.items() if a and c in rows]
        for key in sorted({k for _, a in labelled for k in a}):
            pairs = [(rows[c], a[key]) for c, a in labelled if a.get(key) is not None]
            if len({v for _, v in pairs}) < 2 or len(pairs) < 3:
                continue  # nothing to tell apart
            feats = x[[r for r, _ in pairs]].numpy()
            result[f"probe_{key}"] = _probe_accuracy(feats, [v for _, v in pairs], ridge)
    return result
