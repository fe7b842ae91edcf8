"""Tokenizers: the checkpoint's own, or a byte-level fallback when there is none (dummy weights, offline)."""

from __future__ import annotations

import logging

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.loader import model_dir

log = logging.getLogger(__name__)


def _gpt2_byte_order() -> list[int]:
    """GPT-2's first 256 token ids are single bytes, in this order (printable bytes first, then the rest)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    return printable + [b for b in range(256) if b not in printable]


class ByteTokenizer:
    """One token per UTF-8 byte, using the ids GPT-2's vocabulary gives single bytes.

    Text round-trips exactly; ids above 255 (which a real GPT-2 vocabulary maps to merged pieces) decode to
    nothing, since without the vocabulary we cannot know their text.
    """

    def __init__(self, eos_token_id: int | None = 50256):
        order = _gpt2_byte_order()
        self._id_of_byte = {b: i for i, b in enumerate(order)}
        self._byte_of_id = dict(enumerate(order))
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return [self._id_of_byte[b] for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(self._byte_of_id[i] for i in ids if i in self._byte_of_id)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """The checkpoint's tokenizer, behind the same two-method interface as the fallback."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def load_tokenizer(config: EngineConfig, eos_token_id: int | None):
    source = config.tokenizer
    if source is None:
        directory = model_dir(config)
        source = str(directory) if directory is not None else None
    if source is not None:
        try:
            from transformers import AutoTokenizer

            return HFTokenizer(AutoTokenizer.from_pretrained(source))
        except (OSError, ValueError) as e:
            log.warning("could not load a tokenizer from %s: %s", source, e)
    log.warning(
        "!!! NO TOKENIZER for %r: falling back to one token per byte. Prompts given as text are encoded "
        "byte by byte and generated ids above 255 decode to nothing. Give a checkpoint directory (or "
        "`tokenizer:`) for real text. !!!", config.model,
    )
    return ByteTokenizer(eos_token_id)
