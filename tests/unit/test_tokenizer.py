"""Caption tokenizer: hostile captions (a megabyte, one endless word) are bounded in time and memory, while
ordinary captions tokenize exactly as open_clip's tokenizer does."""

from __future__ import annotations

import random
import string
import time
from typing import Any

import numpy as np
import pytest

from raysl.data.tokenizer import CHARS_PER_TOKEN, MAX_RUN_BYTES, Tokenizer

ORDINARY = [
    "a photo of a cat",
    "A RED circle, on the LEFT!!  (2 of 3)",
    "Photo: https://example.com/images/2021/05/holiday-beach-sunset_0042.jpg &amp; more at www.site.org",
    "Donaudampfschifffahrtsgesellschaftskapitän über der Brücke — café déjà vu",
    "一只猫坐在红色的沙发上看着窗外的鸟儿在树枝上唱歌",
    "สุนัขกำลังวิ่งเล่นในสวนสาธารณะกับเจ้าของในวันหยุดสุดสัปดาห์ที่แดดจ้าและอากาศดีมาก",
    "Ð¡Ð»Ð¾Ð²Ð¾ mojibake fixed by ftfy, 😀 emoji and numbers 1234567890",
    # longer than the context: cut, with end-of-text last
    " ".join(f"word{i} and some filler text about item number {i}" for i in range(60)),
    "",
]


@pytest.fixture(scope="module")
def reference() -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=77)


def test_ordinary_captions_match_open_clip_exactly(reference: Any) -> None:
    tok = Tokenizer(77)
    ours = tok.encode(ORDINARY)
    theirs = reference(ORDINARY, context_length=77).numpy()
    np.testing.assert_array_equal(ours, theirs.astype(np.int32))
    assert (ours[7, -1] == tok.eot_id) and (ours[7] != 0).all()  # the long one fills the context


def test_caption_cut_keeps_every_token_that_reaches_the_output(reference: Any) -> None:
    tok = Tokenizer(16)
    words = "the quick brown fox jumps over a lazy dog " * 2000  # 84 kB of ordinary words
    assert len(words) > tok.max_chars == 16 * CHARS_PER_TOKEN
    expected = reference([words], context_length=16).numpy().astype(np.int32)
    np.testing.assert_array_equal(tok.encode([words]), expected)


def _random_run(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


@pytest.mark.parametrize("caption", [_random_run(1_000_000),
                                     " ".join(_random_run(1_000, s) for s in range(1_000))],
                         ids=["1MB-one-word", "1MB-long-words"])
def test_a_megabyte_caption_is_fast(caption: str) -> None:
    tok = Tokenizer(77)
    start = time.perf_counter()
    ids = tok.encode([caption, "a photo of a cat"])
    elapsed = time.perf_counter() - start
    # unbounded: hours for the single word, minutes for the second; bounded: ~0.15 s at most
    assert elapsed < 3.0, elapsed
    assert ids.shape == (2, 77) and ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert tok.decode(ids[1]) == "a photo of a cat"


def test_a_long_run_is_cut_at_the_byte_bound() -> None:
    tok = Tokenizer(200)
    run = _random_run(MAX_RUN_BYTES * 4, seed=3)
    np.testing.assert_array_equal(tok.encode([run]), tok.encode([run[:MAX_RUN_BYTES]]))
    assert not np.array_equal(tok.encode([run[: MAX_RUN_BYTES // 2]]), tok.encode([run[:MAX_RUN_BYTES]]))


def test_word_cache_is_bounded_and_results_do_not_change() -> None:
    tok = Tokenizer(77, max_cached_words=50)
    captions = [_random_run(12, seed=s) for s in range(400)]
    first = tok.encode(captions)
    cache = tok._bpe.cache
    assert len(cache) <= 50
    assert "<start_of_text>" in cache and "<end_of_text>" in cache  # special tokens survive a reset
    np.testing.assert_array_equal(tok.encode(captions), first)
