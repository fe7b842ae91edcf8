"""Build a tiny GPT-2 checkpoint on disk (config + safetensors + a trained BPE tokenizer), with no download.

Tests and CPU demos load it through the same path as a real checkpoint. Weights are drawn wider than GPT-2's
usual 0.02 (``initializer_range`` 0.3): with 0.02 the random layers barely change the residual stream and the
model just repeats its last token, which would make greedy comparisons trivial; at 0.3 its output varies, the
median gap between the two best logits is ~0.7 (so no comparison hinges on a near-tie decided by rounding) and
sampling at temperature 1 is genuinely random.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch


def _corpus() -> list[str]:
    """Text available offline: the source of a few standard-library modules."""
    import argparse
    import collections
    import json as json_mod
    import textwrap

    return [inspect.getsource(m) for m in (argparse, collections, json_mod, textwrap)]


def build_tiny_checkpoint(path: str | Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                          vocab_size: int = 512, n_positions: int = 512, seed: int = 0,
                          initializer_range: float = 0.3) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    eos = tok.token_to_id("<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(path)

    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos,
                        initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path, safe_serialization=True)
    (path / "tiny_model.json").write_text(json.dumps({"seed": seed, "initializer_range": initializer_range}))
    return path
