"""Remembered token counts are the counts the encoder gives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsproxy.adapters.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def warm() -> Tokenizer:
    return Tokenizer()


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=5))
def test_a_remembered_count_is_the_count(warm: Tokenizer, texts: list[str]) -> None:
    for text in texts + texts:  # the second round is answered from memory
        assert warm.count(text) == (warm._encode_count(text) if text else 0)


def test_a_conversation_is_counted_the_same_on_every_turn(warm: Tokenizer) -> None:
    history = [
        {"role": "user" if turn % 2 == 0 else "assistant", "content": f"turn {turn} " * 60}
        for turn in range(20)
    ]
    long_message = {"role": "user", "content": "长文本 " * 3_000}  # beyond what is remembered
    first = warm.count_prompt([*history, long_message])
    assert warm.count_prompt([*history, long_message]) == first
    changed = [*history[:-1], {"role": "assistant", "content": "turn 19 changed"}, long_message]
    assert warm.count_prompt(changed) != first


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300), tokens_max=st.integers(0, 80))
def test_truncate_keeps_a_start_of_the_text_within_the_tokens(
    warm: Tokenizer, text: str, tokens_max: int
) -> None:
    kept = warm.truncate(text, tokens_max)
    assert text.startswith(kept)
    assert warm.count(kept) <= tokens_max
    if warm.count(text) <= tokens_max:
        assert kept == text


def test_long_texts_count_the_same_through_the_batch_encoder(warm: Tokenizer) -> None:
    """Past 2,000 characters counting goes through `encode_batch` (it lets the GIL go, so a
    worker thread counting a megabyte no longer stalls the event loop): same counts."""
    for text in ("hello wörld 长文本 " * 400, "x" * 2_001, "a b\n" * 5_000):
        expected = len(warm._encoder.encode(text, add_special_tokens=False).ids)
        assert warm.count(text) == expected


def test_remembered_counts_do_not_keep_their_texts(warm: Tokenizer) -> None:
    """The texts were the cache's keys, each with the UTF-8 copy Python keeps once a string is
    encoded: 4,096 Chinese messages held over 150 MB, not the 32 MiB meant."""
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(200):
            assert warm.count(f"{index} " + "长文本" * 2_500) > 0  # remembered: under 8,192
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, kept  # the texts came to 200 x ~37 kB
