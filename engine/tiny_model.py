"""Build a tiny GPT-2 checkpoint on disk (config + safetensors + a trained BPE tokenizer), with no download.

Tests and CPU demos load it through the same path as a real checkpoint. The token embedding is drawn wider
than GPT-2's usual 0.02 so that the logits of a random model are well separated: comparisons of greedy output
against another implementation then do not hinge on near-ties decided by rounding.
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
                          embedding_std: float = 0.5) -> Path:
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
                        n_head=n_head, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, embedding_std)
    model.save_pretrained(path, safe_serialization=True)
    (path / "tiny_model.json").write_text(json.dumps({"seed": seed, "embedding_std": embedding_std}))
    return path
