"""Captions → token ids with CLIP's byte-level BPE tokenizer, offline.

The tokenizer and its 49,408-entry vocabulary ship inside the open_clip_torch wheel
(`bpe_simple_vocab_16e6.txt.gz`), so nothing is fetched at run time. Each caption becomes
[start, tokens…, end, 0…] of a fixed context length; a caption that is too long is cut and its last
slot set to the end-of-text token, which is where the text tower pools.

Hostile captions are bounded: BPE time grows faster than linearly in the length of a run of letters (a 4,000-char
run takes 0.6 s, a 1 MB one hours), so a caption is cut to `context_length × 64` characters before it is cleaned,
each run the BPE sees is cut to 256 bytes, and the BPE's per-word cache is emptied when it grows past 100,000 words.
Captions that fill the context with ordinary text tokenize exactly as before (see the constants below).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

# Characters of caption kept per context slot. The longest token in CLIP's vocabulary is 32 characters, so the
# 75 tokens between start and end take at most 75 × 33 characters of cleaned text (a space between words);
# 64 per slot leaves room for what cleaning removes (HTML entities, mojibake repair, runs of whitespace). A
# caption cut here keeps every token that reaches the output.
CHARS_PER_TOKEN = 64
# Bytes of one run of letters (or of punctuation) that BPE sees; the cost of one run is superlinear (measured:
# 64 B 0.6 ms, 128 B 2.3 ms, 256 B 7.4 ms, 4 KB 0.6 s), so a caption costs at most (chars / 257) × 7.4 ms,
# ~0.14 s at context 77. No dictionary word comes near 256 bytes; scripts written without spaces (Thai,
# Chinese) make long runs, but 256 bytes of them already yield more than 77 tokens (Thai ~1.1 tokens per
# 3-byte character, Chinese ~2.6), so the cut falls past the end of the context.
MAX_RUN_BYTES = 256
# Distinct words the BPE remembers; open_clip's cache is a plain dict that grows with every new word a
# long-running worker meets (garbage strings included). Emptied, not evicted: refilling costs ~0.2 ms a word.
MAX_CACHED_WORDS = 100_000


class Tokenizer:
    def __init__(self, context_length: int = 77, *, max_cached_words: int = MAX_CACHED_WORDS) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self.max_chars = context_length * CHARS_PER_TOKEN
        self.max_cached_words = max_cached_words
        self._bpe = SimpleTokenizer(context_length=context_length)
        self._special = dict(self._bpe.cache)  # the cache starts with the special tokens; a reset keeps them
        # SimpleTokenizer.encode calls self.bpe(run) once per run of letters/punctuation: the instance
        # attribute shadows the method, so every run is cut before the superlinear merge loop sees it.
        self._full_bpe = self._bpe.bpe
        self._bpe.bpe = self._bounded_bpe
        self.vocab_size: int = int(self._bpe.vocab_size)
        self.sot_id: int = int(self._bpe.sot_token_id)
        self.eot_id: int = int(self._bpe.eot_token_id)

    def _bounded_bpe(self, run: str) -> str:
        cache: dict[str, str] = self._bpe.cache
        if len(cache) >= self.max_cached_words:
            cache.clear()
            cache.update(self._special)
        # `run` is byte-level (one character per UTF-8 byte), so this cuts at MAX_RUN_BYTES bytes
        return str(self._full_bpe(run[:MAX_RUN_BYTES]))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings → (N, context_length) int32; truncation keeps the end-of-text token last."""
        if not len(texts):
            return np.zeros((0, self.context_length), dtype=np.int32)
        cut = [t[: self.max_chars] for t in texts]
        return self._bpe(cut, context_length=self.context_length).numpy().astype(np.int32)

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
