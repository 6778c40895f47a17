"""Captions → token ids with CLIP's byte-level BPE tokenizer, offline.

The tokenizer and its 49,408-entry vocabulary ship inside the open_clip_torch wheel
(`bpe_simple_vocab_16e6.txt.gz`), so nothing is fetched at run time. Each caption becomes
[start, tokens…, end, 0…] of a fixed context length; a caption that is too long is cut and its last
slot set to the end-of-text token, which is where the text tower pools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np


class Tokenizer:
    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size: int = int(self._bpe.vocab_size)
        self.sot_id: int = int(self._bpe.sot_token_id)
        self.eot_id: int = int(self._bpe.eot_token_id)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings → (N, context_length) int32; truncation keeps the end-of-text token last."""
        if not len(texts):
            return np.zeros((0, self.context_length), dtype=np.int32)
        return self._bpe(list(texts), context_length=self.context_length).numpy().astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids → text, without the start/end markers and padding."""
        body = [int(i) for i in ids if int(i) not in (0, self.sot_id)]
        if self.eot_id in body:
            body = body[: body.index(self.eot_id)]
        return str(self._bpe.decode(body)).strip()


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int) -> Tokenizer:
    """One tokenizer per process and length: building the BPE merge table takes ~0.5 s."""
    return Tokenizer(context_length)


def caption_text(value: Any, field: str = "caption") -> str:
    """A caption from a str, bytes (a WebDataset `txt`), or a JSON object with `field`; '' if none."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, dict):
        value = value.get(field, "")
    if not isinstance(value, str):
        return ""
    return " ".join(value.split())


def json_caption(raw: Any, field: str) -> str:
    """The `field` of a WebDataset `json` member; '' when missing or not JSON."""
    if raw is None:
        return ""
    try:
        obj = json.loads(bytes(raw).decode("utf-8", errors="replace"))
    except (ValueError, TypeError):
        return ""
    return caption_text(obj, field) if isinstance(obj, dict) else ""
