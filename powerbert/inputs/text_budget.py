"""A bound on every text before it reaches a tokenizer, so that no text's size can exhaust memory.

A fast tokenizer encodes a whole text before it truncates, and for a text pair its
``longest_first`` truncation takes memory that grows faster than the text: a 20,000-word pair
took 10.6 GB. The model sees N tokens at most, so every command (``predict``, ``calibrate``,
training) first cuts each text, and each text of a pair, to ``CHARS_PER_TOKEN * N`` characters,
then on to the end of the word the cut falls in (at most ``MAX_WORD_TAIL`` more characters).

Far above what N tokens need: WordPiece, BPE and SentencePiece tokens of natural text average
4-5 characters, and tokenizers split on white space before anything else, so the words kept
tokenize as they do in the whole text. The tokens the model sees change only for a text that
packs fewer than N tokens into its first ``CHARS_PER_TOKEN * N`` characters (long runs of white
space, words over 100 characters), and, when both texts of a pair are over the bound, in which of
the two gets the odd token that ``longest_first`` truncation hands the longer one.
No torch here.
"""
from __future__ import annotations

import re

CHARS_PER_TOKEN = 64
MAX_WORD_TAIL = 100  # WordPiece's longest word (max_input_chars_per_word); a longer one is [UNK]
_WORD_TAIL = re.compile(rf"\S{{0,{MAX_WORD_TAIL}}}")


def char_budget(max_length: int) -> int:
    """Characters a text keeps before tokenizing at ``max_length`` tokens (N)."""
    return CHARS_PER_TOKEN * max_length


def bound_text(text: str, max_length: int) -> str:
    """``text`` cut to ``char_budget(max_length)`` characters and the rest of the word there."""
    budget = char_budget(max_length)
    if len(text) <= budget:
        return text
    return text[:_WORD_TAIL.match(text, budget).end()]


def bound_texts(texts, max_length: int) -> list[str]:
    """Each of ``texts`` (strings) through :func:`bound_text`; None stays None (no pair)."""
    if texts is None:
        return None
    return [bound_text(text, max_length) for text in texts]
