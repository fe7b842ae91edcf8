"""Checkpoints made on this machine with no download: a tiny GPT-2 (config + safetensors + a trained BPE tokenizer)
for tests and CPU demos, and a published GPT-2's config with a tokenizer of its vocabulary size for dummy weights.

Tests and CPU demos load it through the same path as a real checkpoint. Weights are drawn wider than GPT-2's
usual 0.02 (``initializer_range`` 0.3): with 0.02 the random layers barely change the residual stream and the
model just repeats its last token, which would make greedy comparisons trivial; at 0.3 its output varies, the
median gap between the two best logits is ~0.7 (so no comparison hinges on a near-tie decided by rounding) and
sampling at temperature 1 is genuinely random.
"""

from __future__ import annotations

import inspect
import json
import sysconfig
from pathlib import Path

import torch

EOS = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


def _corpus() -> list[str]:
    """Text available offline: the source of a few standard-library modules."""
    import argparse
    import collections
    import json as json_mod
    import textwrap

    return [inspect.getsource(m) for m in (argparse, collections, json_mod, textwrap)]


def stdlib_sources(min_chars: int = 0) -> list[str]:
    """Every standard-library .py source of this Python (tests and site-packages left out), in path order: text
    that any machine has, for training tokenizers and models offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= min_chars:
            texts.append(text)
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer as GPT-2's (one special token, <|endoftext|>), trained on ``texts``.

    Returns the ``tokenizers.Tokenizer`` and the same wrapped as a transformers fast tokenizer, ready to save."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    return tok, fast


def build_tiny_checkpoint(path: str | Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                          vocab_size: int = 512, n_positions: int = 512, seed: int = 0,
                          initializer_range: float = 0.3) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, fast = train_bpe_tokenizer(_corpus(), vocab_size)
    fast.save_pretrained(path)
    eos = tok.token_to_id(EOS)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos,
                        initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path, safe_serialization=True)
    (path / "tiny_model.json").write_text(json.dumps({"seed": seed, "initializer_range": initializer_range}))
    return path


def build_dummy_model_dir(path: str | Path, like: str = "gpt2") -> Path:
    """A directory for ``load_format: dummy`` that answers text with text, with no network.

    It holds the config of the published model ``like`` (``gpt2`` ... ``gpt2-xl``) and a byte-level BPE tokenizer
    of GPT-2's vocabulary size trained on this Python's standard library, and no weights: the engine draws them.
    Generated ids then decode to visible pieces of text, where the byte-level fallback (no tokenizer at all) turns
    every id above 255 into nothing."""
    from transformers import GPT2Config

    from gpt2serve.engine.loader import GPT2_FAMILY

    if like not in GPT2_FAMILY:
        raise ValueError(f"like={like!r}: one of {', '.join(GPT2_FAMILY)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, fast = train_bpe_tokenizer(stdlib_sources(), GPT2_VOCAB_SIZE)
    fast.save_pretrained(path)
    eos = tok.token_to_id(EOS)
    GPT2Config(**GPT2_FAMILY[like], vocab_size=tok.get_vocab_size(), bos_token_id=eos,
               eos_token_id=eos).save_pretrained(path)
    return path
