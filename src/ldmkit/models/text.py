"""Offline text conditioning for models trained from scratch: a word-level CLIP tokenizer built from the
training captions and a frozen, randomly initialised CLIP text encoder, plus a measure of whether that
encoder tells the captions apart.

Why a random frozen encoder can be enough: the U-ViT consumes the whole last hidden state (one vector
per token position, models/uvit.py ``context_embed``), not a pooled summary, so it only needs distinct
captions to give distinct, linearly readable sequences. With one token per word, each word's random
embedding sits at its own position and the causal attention mixes in what came before it;
``caption_separation`` checks that this holds for the actual captions (nearest-neighbour distances and
a linear probe per attribute) instead of assuming it.

Tokenizer: the byte-level vocabulary of models/tiny.py (every text still tokenises, byte by byte) plus
byte-pair merges learned on the captions' words until each of them is a single token (Sennrich et al.
2016, "Neural Machine Translation of Rare Words with Subword Units", Algorithm 1, run to completion).
The merges are applied by the stock BPE of ``tokenizers`` / transformers' ``CLIPTokenizer``, which
applies the lowest-ranked pair first; a pair can only involve tokens made by earlier merges, so
encoding a training word replays the training merges in order and ends in the same single token. (The
one exception, the same token reached by two merge paths, is checked for and logged.)
"""

from __future__ import annotations

import heapq
import json
import logging
import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmkit.errors import UserError
from ldmkit.models.tiny import BOS, EOS, byte_tokenizer, byte_vocab

log = logging.getLogger(__name__)

# SD's scaled-linear training schedule (as models/tiny.py and methods/uvit.py training_scheduler), so
# SDModels.load finds a scheduler; the U-ViT method builds its own from the same numbers.
_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}
PROBE_RIDGE = 1e-3
"""Ridge penalty of the attribute probe, relative to the mean squared norm of the centred embeddings."""


def caption_words(captions: list[str]) -> Counter[str]:
    """Word counts of ``captions`` as the CLIP tokenizer pre-tokenises them: NFC, collapsed whitespace,
    lower case, CLIP's regex (letters runs, single digits, punctuation runs, 's 't ...), byte-level
    characters (so the words are in the vocabulary's alphabet)."""
    backend = byte_tokenizer().backend_tokenizer
    counts: Counter[str] = Counter()
    for text in captions:
        normal = backend.normalizer.normalize_str(text)
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normal) if w not in (BOS, EOS))
    return counts


def learn_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first (ties: smallest pair), until every word is a single symbol.

    A word's symbols are its characters with ``</w>`` on the last one (CLIP's end-of-word suffix).
    Pair counts are kept up to date incrementally, with a lazy max-heap, so thousands of words take
    well under a second.
    """
    symbols = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    freqs = list(words.values())
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale entry: the count changed since it was pushed
        if pair not in seen:  # a pair can re-form only via another path to the same token; rank it once
            merges.append(pair)
            seen.add(pair)
        merged = pair[0] + pair[1]
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair):
            old = symbols[i]
            new: list[str] = []
            k = 0
            while k < len(old):  # left to right, non-overlapping, like BPE encoding
                if k + 1 < len(old) and (old[k], old[k + 1]) == pair:
                    new.append(merged)
                    k += 2
                else:
                    new.append(old[k])
                    k += 1
            if len(new) == len(old):
                continue  # stale index entry: the pair was consumed by an earlier merge
            for p in zip(old, old[1:]):
                counts[p] -= freqs[i]
                changed.add(p)
            for p in zip(new, new[1:]):
                counts[p] += freqs[i]
                where.setdefault(p, set()).add(i)
                changed.add(p)
            symbols[i] = new
        counts.pop(pair, None)
        for p in changed:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


def build_word_tokenizer(captions: list[str], max_length: int = 32, max_words: int = 4096) -> Any:
    """A CLIPTokenizer whose vocabulary is tiny.py's byte-level one (ids 0..513 unchanged, BOS 512,
    EOS 513) plus BPE merges that make each of the ``max_words`` most frequent caption words one token.

    "a small red circle" becomes BOS + 4 tokens + EOS; any other text still tokenises, falling back to
    sub-words and bytes. ``model_max_length`` is ``max_length`` (the length every prompt is padded to).
    """
    from transformers import CLIPTokenizer

    if max_length < 3:
        raise UserError(f"text max_length must be >= 3 (BOS, a token, EOS), got {max_length}")
    if max_words < 0:
        raise UserError(f"text max_words must be >= 0, got {max_words}")
    words = Counter(dict(caption_words(captions).most_common(max_words)))
    merges = learn_merges(words)
    vocab = byte_vocab()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    split = [w for w in words if len(tokenizer.backend_tokenizer.model.tokenize(w)) != 1]
    if split:  # not expected (see the module docstring); the tokenizer still works, with sub-words
        log.warning("%d caption words are not single tokens, e.g. %r", len(split), split[:5])
    log.info("word tokenizer: %d caption words, %d merges, vocabulary %d", len(words), len(merges), len(vocab))
    return tokenizer


def _write_slow_files(tokenizer: Any, out_dir: Path) -> None:
    """vocab.json and merges.txt next to tokenizer.json, as real CLIP folders have them (older
    transformers' slow CLIPTokenizer reads these)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in lines))


def build_text_encoder(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 32,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    """A frozen (no grad, eval mode) CLIPTextModel with transformers' random CLIP initialisation.

    The same seed gives the same weights; the global torch RNG is left untouched (``fork_rng``). Token
    ids default to tiny.py's BOS 512 / EOS 513 (the pooled output is read at the EOS position).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    if hidden_size % num_heads:
        raise UserError(f"text hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    base = byte_vocab()
    bos = base[BOS] if bos_token_id is None else bos_token_id
    eos = base[EOS] if eos_token_id is None else eos_token_id
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,  # CLIP's MLP ratio
        num_attention_heads=num_heads,
        num_hidden_layers=num_layers,
        max_position_embeddings=max_position_embeddings,
        hidden_act="quick_gelu",  # OpenAI CLIP, as SD1.5's text encoder
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,  # CLIPTokenizer pads with <|endoftext|>
        projection_dim=hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.requires_grad_(False).eval()


def write_text_components(
    out_dir: str | Path,
    captions: list[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int = 32,
    max_words: int = 4096,
    seed: int = 0,
) -> Path:
    """Write ``tokenizer/``, ``text_encoder/``, ``scheduler/`` and ``model_index.json`` to ``out_dir``.

    ``SDModels.load(out_dir, unet=False, vae=VAE_DIR)`` then loads it (SDModels always reads a VAE
    config: pass ``vae=`` / model.vae, or put the VAE in ``out_dir/vae``). model_index.json lists the
    parts present when it is written, under the UViTPipeline they are the text half of.
    """
    import diffusers
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(captions, max_length=max_length, max_words=max_words)
    encoder = build_text_encoder(
        len(tokenizer),
        hidden_size,
        num_layers,
        num_heads,
        max_length,
        seed,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    tokenizer.save_pretrained(out / "tokenizer")
    _write_slow_files(tokenizer, out / "tokenizer")
    encoder.save_pretrained(out / "text_encoder")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**_SCHEDULER, "_diffusers_version": diffusers.__version__}, indent=2) + "\n"
    )
    index: dict[str, Any] = {
        "_class_name": "UViTPipeline",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if (out / "vae" / "config.json").exists():
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    log.info(
        "wrote text components (vocabulary %d, hidden %d, %d layers, transformers %s) to %s",
        len(tokenizer),
        hidden_size,
        num_layers,
        transformers.__version__,
        out,
    )
    return out


@torch.no_grad()
def embed_captions(text_encoder: Any, tokenizer: Any, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Last hidden state [N, L, D] in fp32, tokenised exactly as SDModels / UViTPipeline do (padded to
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
