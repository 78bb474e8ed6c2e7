"""Offline text conditioning for models trained from scratch: a word-level CLIP tokenizer built from the
training captions, a frozen, randomly initialised CLIP text encoder, and the writer of both into a
pipeline folder. Whether the encoder tells the captions apart is measured by
``ldmkit.eval.text_probe.caption_separation``.

Why a random frozen encoder can be enough: the U-ViT consumes the whole last hidden state (one vector
per token position, models/uvit.py ``context_embed``), not a pooled summary, so it only needs distinct
captions to give distinct, linearly readable sequences. With one token per word, each word's random
embedding sits at its own position and the causal attention mixes in what came before it.

Tokenizer: the byte-level vocabulary of models/tiny.py (every text still tokenises, byte by byte) plus
byte-pair merges learned on the captions' words by the ``tokenizers`` library's ``BpeTrainer`` (Sennrich
et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"), run to completion so each
word ends as a single token. The merges are applied by the stock BPE of ``tokenizers`` / transformers'
``CLIPTokenizer``, which applies the lowest-ranked pair first; a pair can only involve tokens made by
earlier merges, so encoding a training word replays the training merges in order and ends in the same
single token. (The one exception, the same token reached by two merge paths, is checked for and logged.)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ldmkit.errors import UserError
from ldmkit.models.tiny import BOS, EOS, byte_tokenizer, byte_vocab

log = logging.getLogger(__name__)

# SD's scaled-linear training schedule (as models/tiny.py and methods/uvit.py training_scheduler), so
# the model families find a scheduler; the U-ViT method builds its own from the same numbers.
_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


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
    """BPE merges, in rank order, that make every word of ``words`` (word -> count, already
    pre-tokenised by ``caption_words``) a single symbol: ``tokenizers``' BpeTrainer over the byte-level
    alphabet with CLIP's ``</w>`` end-of-word suffix, most frequent pair first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = byte_vocab()
    trainer = trainers.BpeTrainer(
        # Room for every merge (each shortens some word by a symbol); training stops when no pair is left.
        vocab_size=len(base) + sum(len(w) for w in words),
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # The trainer breaks ties between equally frequent pairs by symbol id and would number the
        # "c</w>" symbols in hash-map order (different merges from run to run); listing the byte
        # vocabulary first gives every initial symbol its tiny.py id.
        special_tokens=list(base),
        end_of_word_suffix="</w>",
    )
    # No normalizer or pre-tokenizer: the words are CLIP-pre-tokenised already, each input one word.
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.train_from_iterator((w for w, n in words.items() for _ in range(n)), trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


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

    ``load_family`` then loads it with ``model.vae`` pointing at a VAE (a family always reads a VAE
    config: pass model.vae, or put the VAE in ``out_dir/vae``). model_index.json lists the
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
