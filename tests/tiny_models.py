"""Tiny, download-free model / tokenizer / dataset fixtures for CPU tests.

Shared by the loss tests and the TRL-integration tests. Nothing here touches the network; callers should still set
``HF_HUB_OFFLINE=1`` before importing ``transformers`` / ``trl`` (``offline_env()`` does it).

- ``tiny_tokenizer()``: a ``tokenizers`` WordLevel tokenizer (words ``w0``..``w{n-1}`` plus ``<pad>``, ``<unk>``,
  ``<bos>``, ``<eos>`` as special tokens) wrapped in ``PreTrainedTokenizerFast``. Whitespace pre-tokenizer, so a
  completion with a leading space keeps the prompt a token prefix.
- ``tiny_llama(seed)``: a randomly initialised ``LlamaForCausalLM`` (fp32, eager attention) matching the tokenizer.
- ``perturbed_copy(model, scale, seed)``: a deep copy with Gaussian noise on every parameter (a reference model
  that differs from the policy, so DPO losses are not at their constants).
- ``tiny_preference_dataset(n, seed)``: a ``datasets.Dataset`` with prompt / chosen / rejected text columns, with
  varied and unequal completion lengths.
"""

from __future__ import annotations

import copy
import os
import random

VOCAB_WORDS = 296
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def offline_env() -> None:
    """Make sure nothing tries to reach the Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_vocab(n_words: int = VOCAB_WORDS) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    return vocab


def tiny_tokenizer(n_words: int = VOCAB_WORDS):
    """WordLevel tokenizer over ``w0 .. w{n_words-1}`` (+ 4 special tokens), as a ``PreTrainedTokenizerFast``."""
    offline_env()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(n_words), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    fast.model_max_length = 4096
    return fast


def tiny_llama(seed: int = 0, *, vocab_size: int | None = None, hidden_size: int = 32, num_layers: int = 2,
               tie_word_embeddings: bool = False):
    """Randomly initialised fp32 Llama sized for the tiny tokenizer (vocab 300 by default)."""
    offline_env()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None:
        vocab_size = VOCAB_WORDS + len(SPECIAL_TOKENS)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Default init (std 0.02) gives near-uniform next-token distributions; widen the head so log-probs vary.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        model.lm_head.weight.normal_(0.0, 0.5, generator=gen)
    return model.float().eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """Deep copy of ``model`` with N(0, scale^2) noise added to every parameter."""
    import torch

    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return ref


def _words(rng: random.Random, n: int, n_words: int) -> str:
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))


def tiny_preference_rows(n: int = 8, seed: int = 0, n_words: int = VOCAB_WORDS,
                         prompt_len: tuple[int, int] = (2, 6), completion_len: tuple[int, int] = (1, 9)):
    """``n`` dicts with ``prompt`` / ``chosen`` / ``rejected`` text; completions start with a space."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = _words(rng, rng.randint(*prompt_len), n_words)
        lc = rng.randint(*completion_len)
        lr = rng.randint(*completion_len)
        if i == 0:  # make sure at least one pair has clearly unequal lengths in each direction
            lc, lr = completion_len[0], completion_len[1]
        elif i == 1:
            lc, lr = completion_len[1], completion_len[0] + 1
        rows.append({"prompt": prompt, "chosen": " " + _words(rng, lc, n_words),
                     "rejected": " " + _words(rng, lr, n_words)})
    return rows


def tiny_preference_dataset(n: int = 8, seed: int = 0, **kwargs):
    """A ``datasets.Dataset`` of ``tiny_preference_rows(n, seed)``."""
    offline_env()
    from datasets import Dataset

    return Dataset.from_list(tiny_preference_rows(n, seed, **kwargs))


def cpu_dpo_config(prefix: str = "fastdpo_", **overrides):
    """A TRL DPOConfig for these tiny models on a CPU: no reporting, no checkpoints, fp32, no
    gradient checkpointing (DPOConfig defaults to bf16 and checkpointing), a throwaway output dir."""
    import tempfile

    from trl import DPOConfig

    kwargs = dict(output_dir=tempfile.mkdtemp(prefix=prefix), report_to="none", use_cpu=True, save_strategy="no",
                  bf16=False, gradient_checkpointing=False, seed=0)
    kwargs.update(overrides)
    return DPOConfig(**kwargs)
